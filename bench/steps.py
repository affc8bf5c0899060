"""Whole training steps, as a user feels them: full fine-tuning vs LoRA, QLoRA, DoRA, eager vs compiled.

    python -m bench.steps --out bench-out/steps.json                       # the default matrix, 1B shape
    python -m bench.steps --only lora:eager,full:eager --shape tiny        # any subset (CPU: tiny shape)

A Llama-shaped model with RANDOM weights (speed and memory do not depend on the values), bf16, batch x seq
tokens, r = 16 on all seven projections of every layer, AdamW, no gradient checkpointing unless asked. Each configuration
runs in a process of its own (a peer that patches libraries, or a compiled graph, cannot leak into the next)
and reports, after warm-up, `repeats` timing windows of `steps` steps each:

* GPU time per step: CUDA events around each step (median within a window);
* host time per step: the host's clock from the start of a step until it has issued all of it, without
  waiting for the GPU. When host time ≈ GPU time, the host sets the pace (eager launches); under CUDA graphs
  host time drops far below GPU time;
* tokens/s (from the GPU time), the peak of allocated GPU memory, and the loss before any update, which
  every LoRA configuration must share with full fine-tuning's model (B = 0 at the start; QLoRA's differs by
  its 4-bit rounding) and which a compiled run must share with its eager twin.

The figure for a configuration is the median over windows, with the windows' min and max as its spread.
Compiling counts once and is reported apart (`compile_s`).

Modes: "eager"; "compile" (`minilora.fast.compile_model(model)`: `torch.compile(model)`, inductor, kept one
graph under gradient checkpointing); "graphs" (the same with `mode="reduce-overhead"`: inductor plus CUDA
graphs, so each step replays recorded launches); "layers"
(`minilora.fast.compile_layers(model)`: each decoder layer compiled whole, in place, with its gradient
checkpoint traced inside the compiled call where there is one, so backward recomputes within its own graph
and only what it needs; one graph compiled once and reused by every layer, so compiling takes seconds at any
depth). Two former forms of compile_layers, to compare with: "eagerckpt" (each whole layer compiled, run
inside an eager checkpoint, which runs the compiled forward again before backward: three compiled calls per
layer and step where "layers" makes two) and "parts" (`compile()` on each layer's attention, MLP and norms
apart, one graph per kind of part, four compiled calls per layer and pass).

`--profile` adds, after the timing windows, two profiled steps: the GPU time of their kernels per step by kind
(GEMM, attention, NF4 dequantize/W' build, cross-entropy, optimizer, inductor's fusions, norm/rotary/activation
kernels, copies between host and GPU memory, other copies and casts, the rest), their number, and "busy": the
kernels' summed time over the steps' GPU time (below 1 where the GPU waited; the profiler's own host work
lowers it, so it is a lower bound; copies on a side stream overlap compute and can raise it). `--memory` adds
one step under torch's allocation history: the memory allocated before it, the most it held at once on top,
and what was alive at that moment, by the code that allocated it.

Peers, each in a process of its own: PEFT ("peft-lora", "peft-dora", "peft-qlora" on bitsandbytes' Linear4bit),
torchao's NF4 ("torchao-qlora": every linear layer but the head holds a torchao `NF4Tensor` weight, which
`F.linear` dispatches to torchao's `linear_nf4`, with PEFT's adapters on top: torchtune's QLoRA layer, meant to
run compiled, so pair it with the "layers" or "compile" mode),
Unsloth ("unsloth-lora", "unsloth-qlora": its patched Llama model loaded with `FastLanguageModel.from_pretrained`
from the same random weights saved to disk once, adapters from its `get_peft_model`), and Liger's kernels
(a "+liger" suffix on any method: RMSNorm, RoPE, SwiGLU and the fused linear cross-entropy patched into
transformers' Llama before the model is built; "+lce": the fused linear cross-entropy alone, which composes
with the "layers" mode). `--checkpointing` turns on gradient checkpointing (Unsloth's
own "unsloth" variant for its models, transformers' non-reentrant one for the others); a "+offload" suffix
then keeps each checkpointed layer input in host memory (`minilora.fast.offload_checkpoints`), as Unsloth's
variant does. A "+skipguards" suffix on a compiled mode stops checking compiled code's guards after the
warm-up (`torch.compiler.set_stance(skip_guard_eval_unsafe=True)`: safe here, where shapes and modules no
longer change), which shows how much of the host time the guards take. A "+combo" suffix on a compiled mode
turns on inductor's combo kernels (independent small kernels of a graph, such as the adapters' casts, launched
as one). A "+ce" suffix computes the loss with `minilora.fast.fuse_loss` (the head's logits a chunk of tokens
at a time, as Liger's fused linear cross-entropy does, without its two waits for the GPU per step). Suffixes
combine: "qlora+lce+offload".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

if "--child" in sys.argv[:-1] and sys.argv[sys.argv.index("--child") + 1].startswith("unsloth-"):
    # Unsloth patches transformers, PEFT and TRL when imported: it comes first, and never reaches the network
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1")
    import unsloth  # noqa: F401

import torch
from torch import nn
from torch.profiler import record_function

from bench.common import ALPHA, R, enable_checkpointing
from minilora.memory import LLAMA_SHAPES, LlamaShape, build_llama

SHAPES = {  # 1B: TinyLlama-1.1B's configuration; tiny: for a CPU check of this script; narrow: 16 layers with
    # next to no arithmetic, so a step's time on a CPU is its host time (dispatch, autograd, compiled code's
    # wrappers and guards, checkpointing), the part that sets the pace of a step on a GPU that waits for its host
    "1B": LLAMA_SHAPES["TinyLlama-1.1B"],
    "8B": LLAMA_SHAPES["Llama-3-8B"],
    "tiny": LlamaShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256),
    "narrow": LlamaShape(hidden=32, intermediate=64, layers=16, heads=2, kv_heads=1, vocab=64),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# "frozen": no adapters, nothing trainable, backward through the activations only: the floor under every
# adapter method (a LoRA step cannot cost less than the frozen model's forward and backward).
# "-packed": the same model after minilora.fast.pack_adapters (one cast of all adapters per step).
METHODS = ("full", "frozen", "lora", "lora-packed", "qlora", "qlora-packed", "dora", "dora-packed",
           "peft-lora", "peft-dora", "peft-qlora", "torchao-qlora", "unsloth-lora", "unsloth-qlora")
MODES = ("eager", "compile", "graphs", "layers", "eagerckpt", "parts")
DEFAULT = ("full:eager", "lora:eager", "qlora:eager", "dora:eager", "peft-lora:eager",
           "full:graphs", "lora:graphs", "qlora:graphs", "dora:graphs")


def build_model(shape: str, seq: int, device: torch.device, seed: int = 0) -> nn.Module:
    """A Llama-architecture model with RANDOM weights on `device`, initialized in fp32 (from `seed`), then cast
    to bf16."""
    model = build_llama(SHAPES[shape], torch.float32, device, seed=seed, max_position_embeddings=max(seq, 128),
                        attn_implementation="sdpa")
    return model.to(torch.bfloat16)


def adapt(model: nn.Module, method: str, checkpointing: bool = False) -> nn.Module:
    """The model of one method: every parameter trainable (full), none (frozen) or adapters only; with
    `checkpointing`, transformers' non-reentrant gradient checkpointing (inputs ask for a gradient, so the
    checkpointed layers of a frozen base still run backward)."""
    if checkpointing:
        enable_checkpointing(model)
        if method != "full":
            model.enable_input_require_grads()
    if method == "full":
        return model
    if method == "frozen":
        model.requires_grad_(False)
        # the embeddings' output asks for a gradient, so backward runs through every layer as it does for LoRA
        model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_())
        return model
    if method.startswith("peft-") or method == "torchao-qlora":
        import peft

        if method == "torchao-qlora":
            _to_torchao_nf4(model)
        if method == "peft-qlora":
            from bench.train import _to_bnb_4bit

            _to_bnb_4bit(model, next(model.parameters()).device)
            model.is_loaded_in_4bit = True  # as from_pretrained(quantization_config=...) marks it, for PEFT
        config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0,
                                 use_dora=method == "peft-dora")
        return peft.get_peft_model(model, config)
    if method.startswith("unsloth-"):
        raise ValueError("Unsloth's models are loaded by unsloth_model(), not adapted here")
    from minilora.inject import inject
    from minilora.qlora import quantize_model

    from minilora.fast import pack_adapters

    kind = method.removesuffix("-packed")
    if kind == "qlora":
        quantize_model(model, blocksize=64, double_quant=True, compute_dtype=torch.bfloat16)
    inject(model, target_modules=TARGETS, r=R, lora_alpha=ALPHA, use_dora=kind == "dora")
    if method.endswith("-packed"):
        pack_adapters(model)
    return model


def _to_torchao_nf4(model: nn.Module) -> None:
    """Give every nn.Linear but the head a frozen torchao NF4Tensor weight (blocks of 64, their scales quantized
    to 8 bits in groups of 256 blocks, or of the largest power of two that divides the block count for the tiny
    layers of a CPU check)."""
    import math

    from torchao.quantization import to_nf4

    head = model.get_output_embeddings()
    for module in model.modules():
        if type(module) is nn.Linear and module is not head:
            blocks = module.weight.numel() // 64
            group = math.gcd(blocks, 256)
            module.weight = nn.Parameter(to_nf4(module.weight.data, 64, group), requires_grad=False)


def saved_random_model(shape: str, seq: int) -> str:
    """The random model of `build_model` saved once as a transformers folder (bf16 safetensors, config, a
    word-level tokenizer of the vocabulary's size), for peers that load only from disk. Written to a temporary
    folder and renamed, so a folder that exists is whole."""
    import tempfile

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = os.environ.get("MINILORA_BENCH_CACHE", os.path.join(tempfile.gettempdir(), "minilora-bench"))
    path = os.path.join(root, f"llama-{shape}-seq{seq}-seed0")
    if os.path.isdir(path):
        return path
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root)
    model = build_model(shape, seq, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    model.config.dtype = torch.bfloat16
    model.save_pretrained(tmp, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(SHAPES[shape].vocab)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", bos_token="t1", eos_token="t2",
                            pad_token="t3").save_pretrained(tmp)
    del model
    os.replace(tmp, path)
    return path


def unsloth_model(method: str, shape: str, seq: int, checkpointing: bool) -> nn.Module:
    """Unsloth's patched Llama with its LoRA kernels: loaded from the saved random weights (4-bit NF4 with
    double quantization for "unsloth-qlora", as Unsloth's `load_in_4bit` sets bitsandbytes up), adapters r=16
    on the seven projections, dropout 0, no bias (what its fused kernels need)."""
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(model_name=saved_random_model(shape, seq), max_seq_length=seq,
                                                 dtype=torch.bfloat16, load_in_4bit=method == "unsloth-qlora",
                                                 local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                             lora_dropout=0, bias="none", random_state=0,
                                             use_gradient_checkpointing="unsloth" if checkpointing else False)
    FastLanguageModel.for_training(model)
    return model


def compile_parts(model: nn.Module) -> None:
    """The "parts" mode, compile_layers' first form, kept to compare with: `compile()` in place on each
    decoder layer's children (attention, MLP, norms), one graph per kind of part, each running inside the
    layer's gradient checkpoint like any other function; four compiled calls per Llama layer and pass where
    compile_layers makes one."""
    import torch._dynamo

    from minilora.fast import repeated_layers  # the layers compile_layers finds

    layers = repeated_layers(model)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(layers))
    for layer in layers:
        for part in layer.children():
            part.compile()


def compile_in_eager_checkpoint(model: nn.Module) -> None:
    """The "eagerckpt" mode, compile_layers' form before its checkpoint moved inside the compiled call: each
    decoder layer compiled whole (one graph for all), the compiled call run by the layer's own eager checkpoint,
    which keeps the layer's input and runs the compiled forward again before the compiled backward."""
    from functools import partial

    import torch._dynamo

    from minilora.fast import repeated_layers  # the layers compile_layers finds

    layers = repeated_layers(model)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(layers))
    # compiled as compile_layers compiles it: the forward a call's argument, so all layers share one graph
    call = torch.compile(lambda function, *args, **kwargs: function(*args, **kwargs))
    for layer in layers:
        if getattr(layer, "gradient_checkpointing", False):
            checkpoint = layer._gradient_checkpointing_func
            layer._gradient_checkpointing_func = \
                lambda function, *args, _checkpoint=checkpoint, **kwargs: _checkpoint(partial(call, function),
                                                                                     *args, **kwargs)
        else:
            layer.forward = partial(call, layer.forward)


def _events(device: torch.device):
    return (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) \
        if device.type == "cuda" else (None, None)


def run_one(method: str, mode: str, shape: str, batch: int, seq: int, warmup: int, steps: int, repeats: int,
            device: torch.device, checkpointing: bool = False, profile: bool = False,
            memory: bool = False) -> dict[str, Any]:
    """Build, (compile,) warm up and time one configuration; returns its record."""
    base, *suffixes = method.split("+")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
    losses = {"liger", "lce", "ce"} & set(suffixes)
    if not set(suffixes) <= {"liger", "lce", "ce", "offload", "skipguards", "combo"} or len(losses) > 1:
        raise ValueError(f"unknown suffixes in {method} (known: one of +liger, +lce, +ce; +offload, +skipguards, "
                         "+combo)")
    if "ce" in suffixes and base.startswith(("peft-", "unsloth-")):
        raise ValueError("+ce (minilora.fast.fuse_loss) is for the minilora and plain transformers models here")
    if {"skipguards", "combo"} & set(suffixes) and mode == "eager":
        raise ValueError("+skipguards and +combo change compiled code: they need a compiled mode")
    if "combo" in suffixes:  # inductor puts independent small kernels (the adapters' casts) into one launch
        import torch._inductor.config as inductor_config

        inductor_config.combo_kernels = True
    if {"liger", "lce"} & set(suffixes) and mode in ("compile", "graphs"):
        # measured on an H100 (bench/results/steps_wrong_loss.json): the first step's loss came out 2935 and
        # 1e14 where the model's is 12.6 and 10.8, so the fused cross-entropy stays outside compiled code
        raise ValueError("+liger/+lce with a whole-model compile computes a wrong loss: use the layers mode")
    if "offload" in suffixes and (not checkpointing or base.startswith("unsloth-")):
        raise ValueError("+offload keeps checkpointed layer inputs on the host: it needs --checkpointing "
                         "(Unsloth's checkpointing offloads on its own)")
    if {"liger", "lce"} & set(suffixes):  # Liger patches transformers' Llama classes: before the model is built
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        every = "liger" in suffixes
        apply_liger_kernel_to_llama(rope=every, rms_norm=every, swiglu=every, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    if base.startswith("unsloth-"):
        model = unsloth_model(base, shape, seq, checkpointing)
    else:
        model = adapt(build_model(shape, seq, device), base, checkpointing).train()
    if "ce" in suffixes:
        from minilora.fast import fuse_loss

        fuse_loss(model)
    if "offload" in suffixes:
        from minilora.fast import offload_checkpoints

        offload_checkpoints(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda") if params else None
    ids = torch.randint(0, SHAPES[shape].vocab, (batch, seq), device=device,
                        generator=torch.Generator(device).manual_seed(1))
    with torch.no_grad():
        loss0 = float(model(input_ids=ids, labels=ids).loss)
    if mode == "layers":
        from minilora.fast import compile_layers

        compile_layers(model)
    if mode == "parts":
        compile_parts(model)
    if mode == "eagerckpt":
        compile_in_eager_checkpoint(model)
    if mode in ("compile", "graphs"):
        from minilora.fast import compile_model  # torch.compile that stays one graph under checkpointing

        run = compile_model(model, mode="reduce-overhead" if mode == "graphs" else None)
    else:
        run = model

    def step() -> torch.Tensor:
        # the phases are named for the profile's account of where the GPU waits (`stream_gaps`)
        with record_function(PHASES[0]):
            loss = run(input_ids=ids, labels=ids).loss
        with record_function(PHASES[1]):
            loss.backward()
        if opt is not None:
            with record_function(PHASES[2]):
                opt.step()
                opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    first = float(step().detach())  # compiles (when compiling), then the first real step
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    if "skipguards" in suffixes:  # shapes and modules are fixed from here on: every guard would pass
        torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    windows = [_window(step, steps, device) for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    last = float(step().detach())  # after every timed step: configurations that train alike agree here too
    return {
        "method": method, "mode": mode, "shape": shape, "batch": batch, "seq": seq, "steps": steps,
        "checkpointing": checkpointing,
        "loss_step0": loss0, "loss_first_step": first, "loss_last_step": last, "compile_s": compile_s if mode != "eager" else None,
        "trainable": sum(p.numel() for p in params),
        "peak_gib": peak, "windows": windows,
        "profile": kernel_profile(step, device) if profile else None,
        "memory": _memory_or_error(step, device) if memory else None,
    }


def _memory_or_error(step, device: torch.device) -> dict[str, Any] | None:
    """`peak_breakdown`, or its failure as a record: the step's timing stands without it. torch 2.11 fails a
    checkpointed step under the allocation history with "SystemError: ... apply of FunctionMeta returned NULL"
    (pytorch/pytorch#179536; minilora's eager QLoRA steps in call P)."""
    try:
        return peak_breakdown(step, device)
    except SystemError as e:
        return {"error": f"{type(e).__name__}: {e}"}


# kernel name patterns, first match wins: flash/efficient attention; minilora's and bitsandbytes' NF4 kernels;
# cross-entropy (eager, Liger's, Unsloth's); AdamW; inductor's fused kernels; hand-written norm, rotary and
# activation kernels (Liger's, Unsloth's, eager SiLU); cuBLAS, CUTLASS and nvjet GEMMs; copies between host and
# GPU memory (offloaded activations: on a side stream with +offload, so they overlap compute); copies and casts
KERNEL_KINDS = (
    ("attention", r"flash|fmha|attention|attn"),
    ("nf4 dequantize / W' build", r"nf4|lora_weight|dequant"),
    ("cross-entropy", r"cross_entropy|log_softmax|logsoftmax|nll_loss|softmax"),
    ("optimizer", r"multi_tensor|adam"),
    ("inductor fused", r"^triton_"),
    ("norm / rotary / activation", r"rms|norm|rope|rotary|swiglu|silu|_fg_kernel|_dg_kernel"),
    ("GEMM", r"gemm|cutlass|nvjet|xmma|cublas|matmul|splitk"),
    ("host transfer", r"^memcpy (htod|dtoh)"),
    ("copy / cast", r"copy|memcpy|memset|fill|cast|cat_"),
)


def kernel_kind(name: str) -> str:
    """The kind of a GPU kernel, by its name (KERNEL_KINDS)."""
    low = name.lower()
    return next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, low)), "other")


def kernel_profile(step, device: torch.device, steps: int = 2) -> dict[str, Any] | None:
    """GPU kernel time per step by kind over `steps` profiled steps (torch.profiler), with the kernels' count,
    the step's GPU time measured by events around the same steps, and busy = kernel time / GPU time."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    start, end = _events(device)
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
        with open(os.path.join(tmp, "trace.json")) as f:
            gaps = stream_gaps(json.load(f).get("traceEvents", []), steps)
    kinds: dict[str, float] = {}
    names: dict[str, float] = {}
    count = 0
    for e in prof.events():
        # the step's phases (record_function) show on the GPU's timeline too: spans, not kernels
        if e.device_type != torch.autograd.DeviceType.CUDA or e.name in PHASES:
            continue
        ms, kind = e.time_range.elapsed_us() / 1e3 / steps, kernel_kind(e.name)
        kinds[kind] = kinds.get(kind, 0.0) + ms
        names[e.name] = names.get(e.name, 0.0) + ms
        count += 1
    gpu_ms = start.elapsed_time(end) / steps
    top = sorted(names.items(), key=lambda kv: -kv[1])[:12]
    return {"ms_by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])), "kernels": count / steps,
            "kernel_ms": sum(kinds.values()), "gpu_ms": gpu_ms, "busy": sum(kinds.values()) / gpu_ms,
            "top": [{"name": n[:160], "ms": ms} for n, ms in top], "gaps": gaps}


PHASES = ("forward", "backward", "optimizer")  # a step's parts, as `run_one`'s step names them to the profiler


def host_work(events: list[dict[str, Any]], lo: float, hi: float, top: int = 6) -> dict[str, float]:
    """What the host ran between lo and hi (µs on the trace's clock): the operators and runtime calls that
    overlap the window, by name, each with its time inside the window in µs (nested calls count in full for
    each level: a window's totals can exceed its length). The `top` largest."""
    spent: dict[str, float] = {}
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in ("cpu_op", "cuda_runtime", "cuda_driver", "python_function"):
            continue
        inside = min(hi, e["ts"] + e.get("dur", 0.0)) - max(lo, e["ts"])
        if inside > 0:
            spent[e["name"][:80]] = spent.get(e["name"][:80], 0.0) + inside
    return {name: round(us, 1) for name, us in sorted(spent.items(), key=lambda kv: -kv[1])[:top]}


def stream_gaps(events: list[dict[str, Any]], steps: int, top: int = 8) -> dict[str, Any] | None:
    """Where the compute stream sat idle inside the profiled steps, per step, from a chrome trace's events.

    The compute stream is the one with the most kernel time. Each idle stretch between two of its kernels
    (and from a phase's start to its first kernel) is "host" when the next kernel was launched after the
    stretch began (the GPU waited for the host to issue it) and "queued" when it was launched before (the
    kernel waited in the queue: on another stream's event, a copy, or the launch itself, a few µs). Reported
    in ms per step: each kind's total, split by phase (`PHASES`, the host-side span the launch fell in) and by
    the stretch's length, the `top` longest with the kernel after them (and, for a "host" stretch, what the
    host ran while the stream waited: `host_work`), the host calls that wait for the GPU (synchronizations over
    50 µs), and the kernels per step on that stream.
    """
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not kernels:
        return None
    busy: dict[Any, float] = {}
    for e in kernels:
        if e["cat"] == "kernel":
            busy[e["args"].get("stream")] = busy.get(e["args"].get("stream"), 0.0) + e["dur"]
    stream = max(busy, key=busy.get)
    mine = sorted((e for e in kernels if e["args"].get("stream") == stream), key=lambda e: e["ts"])
    launched = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    spans = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                   if e.get("cat") == "user_annotation" and e.get("name") in PHASES)
    if not spans:
        return None

    def phase(ts: float) -> str:
        return next((name for lo, hi, name in spans if lo <= ts <= hi), "between")

    bands = ((0.0, 5.0, "< 5 us"), (5.0, 50.0, "5-50 us"), (50.0, 1e3, "50 us-1 ms"), (1e3, float("inf"), ">= 1 ms"))
    totals = {"host": 0.0, "queued": 0.0}
    by_phase: dict[str, dict[str, float]] = {}
    by_band: dict[str, dict[str, float]] = {}
    longest: list[tuple[float, str, str, str]] = []
    step_starts = [lo for lo, _, name in spans if name == PHASES[0]]
    # the profiled steps' kernels: those launched while a step ran (the GPU finishes them later)
    mine = [e for e in mine if spans[0][0] <= launched.get(e["args"].get("correlation"), e["ts"]) <= spans[-1][1]]
    previous_end = None
    for e in mine:
        # the stretch begins where the stream's last kernel ended, or where a step began after that (the time
        # between steps, while the benchmark waits for the last one, is no part of a step)
        fresh = [t for t in step_starts if t <= e["ts"] and (previous_end is None or t > previous_end)]
        began = fresh[-1] if fresh else previous_end
        previous_end = max(previous_end or 0.0, e["ts"] + e["dur"])
        idle = e["ts"] - began if began is not None else 0.0
        if idle <= 0:
            continue
        at = launched.get(e["args"].get("correlation"))
        kind = "host" if at is not None and at >= began else "queued"
        where = phase(at if at is not None else e["ts"])
        totals[kind] += idle
        by_phase.setdefault(where, {"host": 0.0, "queued": 0.0})[kind] += idle
        band = next(label for lo, hi, label in bands if lo <= idle < hi)
        by_band.setdefault(band, {"host": 0.0, "queued": 0.0, "count": 0.0})
        by_band[band][kind] += idle
        by_band[band]["count"] += 1
        longest.append((idle, kind, where, e["name"][:100], began, at))
    syncs: dict[str, dict[str, float]] = {}
    for e in events:
        # inside a step's phases: the benchmark's own wait for the last step ("between") is no part of it
        if e.get("cat") == "cuda_runtime" and "ynchronize" in e.get("name", "") and e.get("dur", 0) > 50 \
                and phase(e["ts"]) != "between":
            s = syncs.setdefault(f"{e['name']} ({phase(e['ts'])})", {"count": 0.0, "ms": 0.0})
            s["count"] += 1 / steps
            s["ms"] += e["dur"] / 1e3 / steps

    def per_step(d: dict[str, float]) -> dict[str, float]:
        return {k: (v if k == "count" else v / 1e3) / steps for k, v in d.items()}

    longest.sort(key=lambda t: -t[0])
    return {"host_ms": totals["host"] / 1e3 / steps, "queued_ms": totals["queued"] / 1e3 / steps,
            "kernels": len(mine) / steps,
            "by_phase": {k: per_step(v) for k, v in sorted(by_phase.items())},
            "by_length": {label: per_step(by_band[label]) for _, _, label in bands if label in by_band},
            "longest": [{"us": round(t[0], 1), "kind": t[1], "phase": t[2], "next": t[3],
                         **({"host_did": host_work(events, t[4], t[5])} if t[1] == "host" else {})}
                        for t in longest[:top]],
            "syncs": syncs}


def peak_breakdown(step, device: torch.device) -> dict[str, Any] | None:
    """What one step holds at its peak of allocated GPU memory: the memory already allocated when the step
    begins (weights, adapters, optimizer state), and the step's own allocations alive at its peak, summed by
    the code that allocated them (torch.cuda.memory's allocation history; `peak_of`)."""
    if device.type != "cuda":
        return None
    _sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    try:
        step()
        _sync(device)
        trace = torch.cuda.memory._snapshot()["device_traces"][device.index or 0]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return {"before_gib": before / 2**30, **peak_of(trace)}


def peak_of(trace: list[dict[str, Any]], top: int = 12) -> dict[str, Any]:
    """Replay an allocation trace (events with action 'alloc' or 'free_completed', addr, size, frames): the
    most its allocations held at once, in GiB, and those alive then, in MiB by the innermost frame in one of
    _SITES (`_allocated_by`), the `top` largest. Memory allocated before the trace began is not counted."""
    def replay(until: int) -> tuple[dict[int, dict[str, Any]], int, int]:
        live: dict[int, dict[str, Any]] = {}
        held = peak = at = 0
        for i, e in enumerate(trace[:until]):
            if e["action"] == "alloc":
                live[e["addr"]] = e
                held += e["size"]
                if held > peak:
                    peak, at = held, i + 1
            elif e["action"] == "free_completed" and e["addr"] in live:
                held -= live.pop(e["addr"])["size"]
        return live, peak, at

    _, peak, at = replay(len(trace))
    alive, _, _ = replay(at)  # the trace up to its peak: what was held then
    by_site: dict[str, float] = {}
    for e in alive.values():
        site = _allocated_by(e.get("frames", []))
        by_site[site] = by_site.get(site, 0.0) + e["size"] / 2**20
    return {"step_peak_gib": peak / 2**30, "mib_by_site": dict(sorted(by_site.items(), key=lambda kv: -kv[1])[:top])}


# where an allocation is attributed: the innermost frame in one of these (inductor's generated code: "compiled")
_SITES = ("minilora/", "transformers/", "liger_kernel/", "unsloth", "peft/", "bitsandbytes/", "torchao/",
          "torch/optim/", "torch/utils/checkpoint", "torchinductor", "bench/")


def _allocated_by(frames: list[dict[str, Any]]) -> str:
    """`path:line function` of the innermost frame in one of _SITES, else of the innermost Python frame."""
    py = [f for f in frames if f.get("filename", "").endswith(".py")]
    for f in py:
        name = f["filename"]
        site = next((site for site in _SITES if site in name), None)
        if site == "torchinductor":
            return f"compiled code:{f['line']} {f['name']}"
        if site:
            return f"{name[name.index(site):]}:{f['line']} {f['name']}"
    return f"{py[0]['filename'].rsplit('/', 1)[-1]}:{py[0]['line']} {py[0]['name']}" if py else "(no Python frame)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def _window(step, steps: int, device: torch.device) -> dict[str, float]:
    """`steps` steps: median GPU ms per step (events) and median host ms per step (issue time, no sync)."""
    gpu, host = [], []
    for _ in range(steps):
        start, end = _events(device)
        if start is not None:
            start.record()
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e3)
        if end is not None:
            end.record()
            end.synchronize()
            gpu.append(start.elapsed_time(end))
        else:
            gpu.append(host[-1])
    return {"gpu_ms": _median(gpu), "host_ms": _median(host)}


def summarize(record: dict[str, Any]) -> dict[str, Any]:
    """Median over repeats and its spread (min, max), tokens/s from the GPU time. A repeat is a process of its
    own when the configuration ran in several (`--procs`; each process's figure is the median of its windows),
    else a window."""
    if "procs" in record:
        gpu = [_median([w["gpu_ms"] for w in p]) for p in record["procs"]]
        host = [_median([w["host_ms"] for w in p]) for p in record["procs"]]
    else:
        gpu = [w["gpu_ms"] for w in record["windows"]]
        host = [w["host_ms"] for w in record["windows"]]
    tokens = record["batch"] * record["seq"]
    return {"gpu_ms": _median(gpu), "gpu_ms_min": min(gpu), "gpu_ms_max": max(gpu), "host_ms": _median(host),
            "host_ms_min": min(host), "host_ms_max": max(host), "tokens_per_s": tokens / (_median(gpu) * 1e-3)}


# ---------------------------------------------------------------------------------------------------------
# The driver: each configuration in its own process, then one table


def _child(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.build_config:
        from minilora.kernels.lora_weight import LORA_WEIGHT_CONFIG

        for kind, config in json.loads(args.build_config).items():
            LORA_WEIGHT_CONFIG[kind] = {**LORA_WEIGHT_CONFIG[kind], **config}
    method, mode = args.child.split(":")
    record = run_one(method, mode, args.shape, args.batch, args.seq, args.warmup, args.steps, args.repeats, device,
                     args.checkpointing, args.profile, args.memory)
    print("RESULT " + json.dumps(record), flush=True)
    return 0


def _spawn(config: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one configuration in `args.procs` fresh processes, one after another; one record."""
    records = [_spawn_one(config, args) for _ in range(max(1, args.procs))]
    failed = [r for r in records if "error" in r]
    if failed:
        return failed[0]
    record = records[0]
    if len(records) > 1:
        record["procs"] = [r["windows"] for r in records]
        record["wall_s"] = sum(r["wall_s"] for r in records)
        record["peak_gib"] = max((r["peak_gib"] or 0) for r in records) if record["peak_gib"] is not None else None
    record.update(summarize(record))
    return record


def _spawn_one(config: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.steps", "--child", config, "--shape", args.shape, "--batch",
           str(args.batch), "--seq", str(args.seq), "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--repeats", str(args.repeats)] + (["--checkpointing"] if args.checkpointing else []) \
        + (["--profile"] if args.profile else []) + (["--memory"] if args.memory else []) \
        + (["--build-config", args.build_config] if args.build_config else [])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"config": config, "error": f"timed out after {args.timeout} s", "wall_s": time.perf_counter() - t0}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        # the exception's own line (CUDA errors end in advice lines), then the last lines
        raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)][-1:]
        return {"config": config, "error": " | ".join(raised + lines[-3:])[-800:], "wall_s": time.perf_counter() - t0}
    record = json.loads(lines[-1][len("RESULT "):])
    record.update(config=config, wall_s=time.perf_counter() - t0)
    return record


def loss_agrees(record: dict[str, Any], rel: float = 0.01) -> bool:
    """Whether a configuration's first timed step computed the model's loss: within `rel` of the loss of the
    same batch before any compiling or update (a step time is a figure only for a step that computes the
    right thing; compiling reassociates sums, so not bit for bit)."""
    return abs(record["loss_first_step"] - record["loss_step0"]) <= rel * abs(record["loss_step0"])


def _table(records: list[dict[str, Any]]) -> str:
    full = {r["mode"]: r for r in records if r.get("method") == "full" and "gpu_ms" in r}
    lines = [f"{'config':<18}{'GPU ms/step':>22}{'host ms/step':>14}{'tok/s':>9}{'peak GiB':>9}"
             f"{'/ full, same mode':>19}{'loss0':>8}{'compile s':>10}"]
    for r in records:
        if "error" in r:
            lines.append(f"{r['config']:<18}  FAILED: {r['error'][:150]}")
            continue
        ref = full.get(r["mode"])
        ratio = f"{r['gpu_ms'] / ref['gpu_ms']:.2f}" if ref else "-"
        spread = f"{r['gpu_ms']:.1f} [{r['gpu_ms_min']:.1f}-{r['gpu_ms_max']:.1f}]"
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        comp = f"{r['compile_s']:.0f}" if r["compile_s"] is not None else "-"
        lines.append(f"{r['config']:<18}{spread:>22}{r['host_ms']:>14.1f}{r['tokens_per_s']:>9.0f}{peak:>9}"
                     f"{ratio:>19}{r['loss_step0']:>8.4f}{comp:>10}"
                     + ("" if loss_agrees(r) else f"  WRONG: first step's loss {r['loss_first_step']:.4g}"))
    for r in records:
        prof = r.get("profile")
        if prof:
            kinds = ", ".join(f"{k} {ms:.1f}" for k, ms in prof["ms_by_kind"].items())
            lines.append(f"  {r['config']}: kernels {prof['kernels']:.0f}/step, busy {prof['busy']:.2f} of "
                         f"{prof['gpu_ms']:.1f} ms; ms by kind: {kinds}")
    return "\n".join(lines)


def _write(path: str, env: Any, args: argparse.Namespace, records: list[dict[str, Any]]) -> None:
    """The records so far, with the environment and settings, written atomically (temporary file, rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = {"environment": env.__dict__ if hasattr(env, "__dict__") else str(env),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "settings": vars(args),
            "records": records, "table": _table(records)}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(DEFAULT), help="method:mode list (methods: %s)" % ", ".join(METHODS))
    ap.add_argument("--shape", default="1B", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="timing windows per process")
    ap.add_argument("--procs", type=int, default=1, help="fresh processes per configuration (independent repeats)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in every configuration")
    ap.add_argument("--profile", action="store_true", help="GPU kernel time by kind over two profiled steps")
    ap.add_argument("--memory", action="store_true",
                    help="what one step holds at its peak of GPU memory, by the code that allocated it")
    ap.add_argument("--build-config", default="",
                    help='JSON: W\' build settings per base kind that replace minilora\'s own '
                         '(kernels.LORA_WEIGHT_CONFIG), as `python -m bench --sections buildsweep` chose them, '
                         'e.g. \'{"nf4": {"variant": "fma", "bm": 32, "bn": 256, "num_warps": 4}}\'')
    ap.add_argument("--out", help="JSON file for the records")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)
    from minilora.profiling import environment

    env = environment("cuda" if torch.cuda.is_available() else "cpu")
    records: list[dict[str, Any]] = []
    for config in args.only.split(","):
        records.append(_spawn(config.strip(), args))
        print(f"done {config}: {records[-1].get('gpu_ms', records[-1].get('error'))}", flush=True)
        if args.out:  # after every configuration, so that a run cut short keeps what it measured
            _write(args.out, env, args, records)
    print(f"{env}\n{args.shape} shape, batch {args.batch} x {args.seq} tokens, r={R} on {len(TARGETS)} projections, "
          f"AdamW, gradient checkpointing {'on' if args.checkpointing else 'off'}; median of " + (f"{args.procs} processes (each the median of {args.repeats} windows of {args.steps} "
          f"steps)" if args.procs > 1 else f"{args.repeats} windows of {args.steps} steps") + f" [min-max]\n{_table(records)}")
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
