"""Benchmark of minilora's fused layers and NF4 kernels against PEFT and bitsandbytes, side by side.

    python -m minilora.bench [--quick] [--train] [--out DIR] [--device cuda|cpu]
                             [--sections layers,nf4,host,train,buildsweep,paths]

Everything runs in one process on one device, with the same inputs for minilora and its peer. Each row is
checked first (relative error ‖out − ref‖/‖ref‖ of the output and of every gradient against a float32
evaluation of the same formula; bit equality for NF4) and only timed if it agrees. Times are medians of
CUDA-event timings after warm-up (`minilora.profiling.time_fn`); peak memory is the allocator's peak
during one call, with the row's own inputs and weights resident.

Sections:
  layers  one layer forward + backward (x requires grad, weights frozen, adapters trained): frozen bf16
          Linear, PEFT LoRA / DoRA, minilora's readable LoRALinear and its fused path, bitsandbytes
          Linear4bit (NF4 + double quant), PEFT QLoRA / QDoRA on it, minilora fused QLoRA / QDoRA.
          Ratios are to the frozen bf16 Linear of the same run. Plus the merged/unmerged crossover.
  nf4     NF4 quantize / dequantize (blocksize 64, with and without double quant) vs bitsandbytes:
          time, bandwidth as a fraction of a device-to-device copy, bit equality. Each row cycles through
          NF4_BUFFERS distinct inputs (more bytes than the L2 cache holds) and records median, quartiles
          and IQR of its timed calls; the double-quant stage alone is timed too.
  host    the layer rows at a toy size (HOST_SHAPE): time per forward + backward ≈ the host's time to
          issue it, and the number of aten operations it dispatches.
  buildsweep  (on request) W' = W0 + s·B A for a dense bf16 and an NF4+DQ W0 at 4096², 8192², 14336x4096:
          each Triton configuration of BUILD_GRID, the PyTorch build, a copy of the same bf16 bytes; GPU time
          of the kernels alone (`time_queued`). Its summary lines set LORA_WEIGHT_CONFIG and TRITON_BUILD.
  paths   (on request) fused LoRA / QLoRA forward + backward, merged vs unmerged, widths 4096 and 8192, N up
          to 16384; the crossover lines set MERGE_CROSSOVER and MERGE_CROSSOVER_FREE_BUILD.
  train   (--train) training steps of Llama-shaped models with RANDOM weights (1B and 8B shapes),
          gradient checkpointing on: minilora QLoRA (fused) vs PEFT + bitsandbytes QLoRA; tokens/s, peak.

`--device cpu --quick` runs every check and code path at toy sizes on a CPU (Triton kernels only under
TRITON_INTERPRET=1): a test of the benchmark's logic, not a measurement.
Writes DIR/bench.json (figures + environment) and DIR/bench.png; prints a compact table last.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata as md
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minilora import fast, kernels
from minilora.dora import NORM_EPS
from minilora.lora import LoRALinear
from minilora.nf4 import dequantize_nf4, quantize_nf4
from minilora.profiling import environment, time_fn

R, ALPHA = 16, 32  # rank and alpha of every adapter here (s = 2)
TOL = 3e-2  # bf16 agreement with the float32 evaluation; bf16 rounding alone gives about 4e-3
DTYPE = torch.bfloat16
# Toy sizes for --device cpu: (width, token counts), both sides of the merged/unmerged crossover (width 256)
CPU_LAYER_PLAN = [(256, [8, 300])]
CPU_NF4_SHAPES = [(256, 256), (96, 320)]
# nf4 rows cycle through this many distinct inputs (at 4096² bf16: 4 x (33.5 MB in + 8.4 MB out), over 3x the
# H100's 50 MB L2), with this many timed calls (full run, --quick) on a GPU
NF4_BUFFERS = 4
NF4_REPS = (100, 40)
# (tokens, width) of the host-overhead rows: small enough that the device work per operation is negligible
HOST_SHAPE = (16, 64)


@dataclass
class Row:
    """One measured line: what, at which size, how fast, how much memory, how close to the reference."""

    section: str
    name: str
    config: str
    ms: float | None = None
    peak_mib: float | None = None
    extra_mib: float | None = None
    ratio: float | None = None
    err: float | None = None
    status: str = "ok"
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Settings:
    device: torch.device
    quick: bool
    warmup: int
    reps: int


# ---------------------------------------------------------------------------------------------------------
# Small helpers


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _rel(got: Tensor, ref: Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    if not torch.isfinite(got).all():
        return math.inf
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def _peak(fn: Callable[[], object], device: torch.device) -> tuple[float | None, float | None]:
    """(peak MiB during fn, peak minus what was allocated before), or Nones on a CPU."""
    if device.type != "cuda":
        fn()
        return None, None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak / 2**20, (peak - before) / 2**20


def _guard(rows: list[Row], row: Row, body: Callable[[Row], None], device: torch.device) -> None:
    """Run one row; any exception is recorded in the row (and the run goes on)."""
    try:
        body(row)
    except Exception as err:  # noqa: BLE001 - a benchmark row must never take the others down
        row.status = "error"
        row.info["error"] = f"{type(err).__name__}: {err}"[:500]
        row.info["trace"] = traceback.format_exc()[-2000:]
    finally:
        rows.append(row)
        _free(device)
    print(f"{row.section:7} " + _compact(row), flush=True)


# ---------------------------------------------------------------------------------------------------------
# Ceilings: what the device can do at best


def measure_ceilings(cfg: Settings) -> dict[str, float]:
    """Device-to-device copy bandwidth (bytes read + written) and a large bf16 matmul rate."""
    dev = cfg.device
    n = 2**28 if dev.type == "cuda" else 2**20  # 512 MiB of bf16 on a GPU
    a = torch.randn(n, device=dev, dtype=DTYPE)
    b = torch.empty_like(a)
    t = time_fn(lambda: b.copy_(a), warmup=cfg.warmup, reps=cfg.reps, device=dev)
    copy_tbs = 2 * a.numel() * a.element_size() / (t.median_ms * 1e-3) / 1e12
    del a, b
    k = 8192 if dev.type == "cuda" else 256
    x = torch.randn(k, k, device=dev, dtype=DTYPE)
    y = torch.randn(k, k, device=dev, dtype=DTYPE)
    t = time_fn(lambda: x @ y, warmup=cfg.warmup, reps=cfg.reps, device=dev)
    tflops = 2 * k**3 / (t.median_ms * 1e-3) / 1e12
    del x, y
    _free(dev)
    return {"copy_TBps": copy_tbs, "matmul_bf16_TFLOPs": tflops, "matmul_size": k}


# ---------------------------------------------------------------------------------------------------------
# Section 1: one layer, forward + backward


class _Wrap(nn.Module):
    """A one-layer model, so that PEFT can find its target by name."""

    def __init__(self, lin: nn.Module) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)


@dataclass
class LayerCase:
    """A layer to time: y = fn(x); `params` are the trainable tensors in the order A, B[, m]."""

    fn: Callable[[Tensor], Tensor]
    params: list[Tensor]
    kind: str  # "frozen" | "lora" | "dora"
    quantized: bool
    module: nn.Module | None = None
    fast_flags: dict[str, Any] = field(default_factory=dict)  # minilora.fast settings for this row


@contextmanager
def _fast_flags(flags: dict[str, Any]) -> Iterator[None]:
    """Set module-level switches of minilora.fast for one row (forward and backward), then restore them."""
    saved = {name: getattr(fast, name) for name in flags}
    for name, value in flags.items():
        setattr(fast, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(fast, name, value)


def _is_bnb_4bit(module: nn.Module) -> bool:
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def _peft_layer(base: nn.Module, use_dora: bool) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    wrapped = _Wrap(base)
    # what transformers sets on a model loaded in 4 bits; PEFT then wraps Linear4bit with its bnb LoRA layer
    wrapped.is_loaded_in_4bit = _is_bnb_4bit(base)
    model = get_peft_model(wrapped, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["lin"],
                                               lora_dropout=0.0, use_dora=use_dora))
    return model.base_model.model.lin


def _set_peft_adapter(layer: nn.Module, A: Tensor, B: Tensor, m: Tensor | None) -> list[Tensor]:
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        if m is not None:
            layer.lora_magnitude_vector["default"].weight.copy_(m)
            params.append(layer.lora_magnitude_vector["default"].weight)
    return params


def _minilora_layer(base: nn.Module, use_dora: bool, A: Tensor, B: Tensor, m: Tensor | None) -> LoRALinear:
    layer = LoRALinear(base, r=R, lora_alpha=ALPHA, use_dora=use_dora)
    with torch.no_grad():
        layer.lora_A["default"].copy_(A)
        layer.lora_B["default"].copy_(B)
        if use_dora:
            layer.lora_magnitude_vector["default"].copy_(m)
    return layer


def _minilora_params(layer: LoRALinear) -> list[Tensor]:
    params = [layer.lora_A["default"], layer.lora_B["default"]]
    if layer.use_dora["default"]:
        params.append(layer.lora_magnitude_vector["default"])
    return params


def _fused(layer: LoRALinear, path: str | None = None) -> Callable[[Tensor], Tensor]:
    def run(x: Tensor) -> Tensor:
        y = fast.fused_forward(layer, x, path=path)
        if y is None:
            raise RuntimeError("fast.fused_forward declined this layer")
        return y
    return run


def _reference(case: LayerCase, x: Tensor, g: Tensor, w32: Tensor, A: Tensor, B: Tensor,
               m: Tensor | None) -> list[Tensor]:
    """float32 y and gradients (x, A, B[, m]) of the formula the case computes, from the same weights."""
    x32 = x.detach().float().requires_grad_(True)
    a32, b32 = A.detach().float().requires_grad_(True), B.detach().float().requires_grad_(True)
    s = ALPHA / R
    if case.kind == "frozen":
        y = F.linear(x32, w32)
        return [y, *torch.autograd.grad(y, [x32], g.float())]
    if case.kind == "lora":
        y = F.linear(x32, w32) + s * F.linear(F.linear(x32, a32), b32)
        return [y, *torch.autograd.grad(y, [x32, a32, b32], g.float())]
    m32 = m.detach().float().requires_grad_(True)
    v = w32 + s * b32 @ a32
    norm = torch.linalg.vector_norm(v, dim=1).detach().clamp_min(NORM_EPS)
    y = F.linear(x32, (m32 / norm)[:, None] * v)
    return [y, *torch.autograd.grad(y, [x32, a32, b32, m32], g.float())]


def _check_case(case: LayerCase, x: Tensor, g: Tensor, w32: Tensor, A: Tensor, B: Tensor,
                m: Tensor | None) -> dict[str, float]:
    y = case.fn(x)
    got = [y, *torch.autograd.grad(y, [x, *case.params], g)]
    ref = _reference(case, x, g, w32, A, B, m)
    names = ["y", "dx", "dA", "dB", "dm"]
    return {names[i]: _rel(a, b) for i, (a, b) in enumerate(zip(got, ref))}


def _layer_cases(width: int, device: torch.device, A: Tensor, B: Tensor, m_factor: Tensor,
                 seed: int) -> tuple[dict[str, Callable[[], LayerCase]], dict[str, Any]]:
    """The rows of the layer section, as builders (each row builds its own layer, then frees it)."""
    from minilora.double_quant import from_bnb
    from minilora.qlora import LinearNF4

    torch.manual_seed(seed)
    base = nn.Linear(width, width, bias=False, device=device, dtype=DTYPE).requires_grad_(False)
    try:
        import bitsandbytes as bnb

        lin4 = bnb.nn.Linear4bit(width, width, bias=False, compute_dtype=DTYPE, compress_statistics=True,
                                 quant_type="nf4", device="meta")
        lin4.weight = bnb.nn.Params4bit(base.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                        compress_statistics=True, blocksize=64).to(device)
        q = from_bnb(lin4.weight.data, lin4.weight.quant_state)  # minilora's 4-bit rows use bnb's own bytes
    except ImportError:  # no bitsandbytes: its rows fail one by one, minilora's use its own quantizer
        lin4 = None
        q = kernels.quantize(base.weight, 64, True)
    w_deq = dequantize_nf4(q, torch.float32)  # the effective weight of every 4-bit row (same bytes)
    shared = {"w32": base.weight.float(), "w32_nf4": w_deq}

    def nf4_base() -> LinearNF4:
        layer = LinearNF4(width, width, bias=False, blocksize=64, double_quant=True, compute_dtype=DTYPE,
                          weight_dtype=DTYPE, device=device)
        layer.load_quantized(q)
        return layer

    def magnitude(dense: Tensor) -> Tensor:
        # PEFT's init value ‖W0 + s·BA‖_row, perturbed so that m/‖V‖ is not 1 and the check means something
        v = dense.float() + (ALPHA / R) * B.float() @ A.float()
        return torch.linalg.vector_norm(v, dim=1) * m_factor

    m_dense, m_nf4 = magnitude(base.weight), magnitude(w_deq)
    shared.update(m_dense=m_dense, m_nf4=m_nf4)

    def peft(b: nn.Module | None, dora: bool, quantized: bool) -> LayerCase:
        if b is None:
            raise RuntimeError("bitsandbytes is not installed")
        layer = _peft_layer(b, dora)
        params = _set_peft_adapter(layer, A, B, (m_nf4 if quantized else m_dense) if dora else None)
        return LayerCase(layer, params, "dora" if dora else "lora", quantized, layer)

    def mini(b: nn.Module, dora: bool, quantized: bool, fused: bool, path: str | None = None) -> LayerCase:
        layer = _minilora_layer(b, dora, A, B, (m_nf4 if quantized else m_dense) if dora else None)
        fn = _fused(layer, path) if fused else layer
        return LayerCase(fn, _minilora_params(layer), "dora" if dora else "lora", quantized, layer)

    def mini_torch_build(dora: bool, path: str | None = None) -> LayerCase:
        case = mini(nf4_base(), dora, True, True, path)
        case.fast_flags = {"USE_TRITON_BUILD": False}  # dequantize, then addmm: the two-pass build
        return case

    builders: dict[str, Callable[[], LayerCase]] = {
        "frozen bf16 nn.Linear": lambda: LayerCase(base, [], "frozen", False, base),
        "PEFT LoRA": lambda: peft(base, False, False),
        "minilora LoRALinear (readable)": lambda: mini(base, False, False, False),
        "minilora fused LoRA": lambda: mini(base, False, False, True),
        "PEFT DoRA": lambda: peft(base, True, False),
        "minilora LoRALinear DoRA (readable)": lambda: mini(base, True, False, False),
        "minilora fused DoRA": lambda: mini(base, True, False, True),
        "bnb Linear4bit NF4+DQ (frozen)": lambda: (LayerCase(lin4, [], "frozen", True, lin4) if lin4 is not None
                                                   else peft(None, False, True)),
        "minilora LinearNF4 NF4+DQ (frozen)": lambda: (lambda l: LayerCase(l, [], "frozen", True, l))(nf4_base()),
        "PEFT QLoRA (bnb NF4+DQ)": lambda: peft(lin4, False, True),
        "minilora fused QLoRA": lambda: mini(nf4_base(), False, True, True),
        "minilora fused QLoRA, torch build": lambda: mini_torch_build(False),
        "PEFT QDoRA (bnb NF4+DQ)": lambda: peft(lin4, True, True),
        "minilora fused QDoRA": lambda: mini(nf4_base(), True, True, True),
        "minilora fused QDoRA, torch build": lambda: mini_torch_build(True),
    }
    shared["path_builders"] = {
        "fused LoRA, merged": lambda: mini(base, False, False, True, "merged"),
        "fused LoRA, unmerged": lambda: mini(base, False, False, True, "unmerged"),
        "fused QLoRA, merged": lambda: mini(nf4_base(), False, True, True, "merged"),
        "fused QLoRA, unmerged": lambda: mini(nf4_base(), False, True, True, "unmerged"),
        "fused QLoRA, merged, torch build": lambda: mini_torch_build(False, "merged"),
    }
    return builders, shared


def _run_layer_row(rows: list[Row], cfg: Settings, name: str, build: Callable[[], LayerCase], tokens: int,
                   width: int, x: Tensor, g: Tensor, A: Tensor, B: Tensor, shared: dict[str, Any],
                   baseline: dict[tuple[int, int], float], section: str = "layers") -> None:
    def body(row: Row) -> None:
        case = build()
        with _fast_flags(case.fast_flags):
            measure(row, case)

    def measure(row: Row, case: LayerCase) -> None:
        w32 = shared["w32_nf4"] if case.quantized else shared["w32"]
        m = (shared["m_nf4"] if case.quantized else shared["m_dense"]) if case.kind == "dora" else None
        errs = _check_case(case, x, g, w32, A, B, m)
        row.err = max(errs.values())
        row.info["errors"] = errs
        if not row.err <= TOL:
            row.status = "MISMATCH"
            return
        inputs = [x, *case.params]

        def step() -> None:
            torch.autograd.grad(case.fn(x), inputs, g)

        row.peak_mib, row.extra_mib = _peak(step, cfg.device)
        t = time_fn(step, warmup=cfg.warmup, reps=cfg.reps, device=cfg.device)
        row.ms = t.median_ms
        row.info.update(min_ms=t.min_ms, max_ms=t.max_ms, reps=t.reps, clock=t.clock)
        if name == "frozen bf16 nn.Linear":
            baseline[(tokens, width)] = t.median_ms
        if (tokens, width) in baseline:
            row.ratio = t.median_ms / baseline[(tokens, width)]
        if isinstance(case.module, LoRALinear) and not case.quantized:
            row.info["path"] = fast.choose_path(tokens, width, width, R)

    _guard(rows, Row(section, name, f"N={tokens} {width}x{width}"), body, cfg.device)


def layer_section(cfg: Settings) -> list[Row]:
    rows: list[Row] = []
    dev = cfg.device
    if dev.type == "cuda":
        plan = [(4096, [16, 8192] if cfg.quick else [16, 1024, 8192])]
        if not cfg.quick:
            plan.append((8192, [1024, 8192]))
        sweep = [16, 1024, 8192] if cfg.quick else [16, 64, 256, 1024, 2048, 4096, 8192]
    else:
        plan, sweep = CPU_LAYER_PLAN, sorted({t for _, ts in CPU_LAYER_PLAN for t in ts})
    baseline: dict[tuple[int, int], float] = {}
    for width, token_list in plan:
        torch.manual_seed(1)
        A = torch.empty(R, width, device=dev)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # PEFT's A init
        B = torch.empty(width, R, device=dev)
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))  # a non-zero B (nn.Linear's init), so the adapter counts
        m_factor = 1 + 0.1 * torch.randn(width, device=dev)
        try:
            builders, shared = _layer_cases(width, dev, A, B, m_factor, seed=2)
        except Exception as err:  # noqa: BLE001
            rows.append(Row("layers", "setup", f"{width}x{width}", status="error", info={"error": repr(err)[:500]}))
            continue
        sweep_here = sweep if width == 4096 or dev.type != "cuda" else []
        for tokens in sorted(set(token_list) | set(sweep_here)):
            torch.manual_seed(3)
            x = torch.randn(tokens, width, device=dev, dtype=DTYPE, requires_grad=True)
            g = torch.randn(tokens, width, device=dev, dtype=DTYPE)
            # the frozen Linear first: every other row is a ratio to it
            chosen = builders if tokens in token_list else {"frozen bf16 nn.Linear": builders["frozen bf16 nn.Linear"]}
            for name, build in chosen.items():
                _run_layer_row(rows, cfg, name, build, tokens, width, x, g, A, B, shared, baseline)
            if tokens in sweep_here:
                for name, build in shared["path_builders"].items():
                    _run_layer_row(rows, cfg, name, build, tokens, width, x, g, A, B, shared, baseline, "paths")
            del x, g
        del builders, shared
        _free(dev)
    return rows


def count_ops(fn: Callable[[], object]) -> int:
    """Top-level aten operations one call of fn dispatches (forward and backward, every thread)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    count = 0
    for event in prof.events():
        if event.name.startswith("aten::"):
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith("aten::"):
                parent = parent.cpu_parent
            count += parent is None
    return count


def host_section(cfg: Settings) -> list[Row]:
    """Each layer row's forward + backward at a toy size (HOST_SHAPE), where the device's own work is a few
    microseconds per operation: the time per call is then what the host spends issuing it (Python, the
    dispatcher, autograd, kernel launches). Median of rounds of back-to-back calls, one sync per round."""
    rows: list[Row] = []
    dev = cfg.device
    tokens, width = HOST_SHAPE
    rounds, steps = (20, 50) if dev.type == "cuda" else (5, 20)
    torch.manual_seed(1)
    A = torch.empty(R, width, device=dev)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    B = torch.empty(width, R, device=dev)
    nn.init.kaiming_uniform_(B, a=math.sqrt(5))
    builders, shared = _layer_cases(width, dev, A, B, 1 + 0.1 * torch.randn(width, device=dev), seed=2)
    builders.update({f"minilora {k}": v for k, v in shared["path_builders"].items()})
    x = torch.randn(tokens, width, device=dev, dtype=DTYPE, requires_grad=True)
    g = torch.randn(tokens, width, device=dev, dtype=DTYPE)
    frozen: list[float] = []

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)  # a toy op gains nothing from threads, and their hand-offs are host time too
    try:
        for name, build in builders.items():
            _host_row(rows, cfg, name, build, x, g, rounds, steps, frozen, sync)
    finally:
        torch.set_num_threads(threads)
    return rows


def _host_row(rows: list[Row], cfg: Settings, name: str, build: Callable[[], LayerCase], x: Tensor, g: Tensor,
              rounds: int, steps: int, frozen: list[float], sync: Callable[[], None]) -> None:
    """One host row: per-call time of `steps` back-to-back forward + backward calls, median over `rounds`."""
    def body(row: Row) -> None:
        case = build()
        inputs = [x, *case.params]

        def step() -> None:
            torch.autograd.grad(case.fn(x), inputs, g)

        with _fast_flags(case.fast_flags):
            for _ in range(max(cfg.warmup, 3) * 4):
                step()
            per_call = []
            for _ in range(rounds):
                sync()
                t0 = time.perf_counter()
                for _ in range(steps):
                    step()
                sync()
                per_call.append((time.perf_counter() - t0) / steps * 1e3)
            row.info["ops"] = count_ops(step)
        q1, _, q3 = statistics.quantiles(per_call, n=4, method="inclusive")
        row.ms = statistics.median(per_call)
        row.info.update(q1_ms=q1, q3_ms=q3, iqr_ms=q3 - q1, min_ms=min(per_call), rounds=rounds, calls=steps,
                        us_per_op=row.ms * 1e3 / max(row.info["ops"], 1))
        if name == "frozen bf16 nn.Linear":
            frozen.append(row.ms)
        if frozen:
            row.ratio = row.ms / frozen[0]

    _guard(rows, Row("host", name, f"N={HOST_SHAPE[0]} {HOST_SHAPE[1]}x{HOST_SHAPE[1]} r{R}"), body, cfg.device)


# crossover kinds: (merged row, unmerged row) of the paths rows
CROSSOVER_KINDS = {"LoRA": ("fused LoRA, merged", "fused LoRA, unmerged"),
                   "QLoRA": ("fused QLoRA, merged", "fused QLoRA, unmerged"),
                   "QLoRA torch build": ("fused QLoRA, merged, torch build", "fused QLoRA, unmerged")}


def crossover(rows: list[Row]) -> dict[str, Any]:
    """Per kind and width (square layers: harmonic mean = width): the smallest token count from which the
    merged path is at least as fast as the unmerged one at every larger count measured, and that count over
    the width (the MERGE_CROSSOVER it suggests). Never crossed: None, and `beyond` = largest N / width."""
    out: dict[str, Any] = {}
    for kind, (merged, unmerged) in CROSSOVER_KINDS.items():
        times: dict[int, dict[int, dict[str, float]]] = {}
        for row in rows:
            if row.section == "paths" and row.name in (merged, unmerged) and row.ms is not None:
                tokens = int(row.config.split()[0][2:])
                width = int(row.config.split()[1].split("x")[0])
                path = "merged" if row.name == merged else "unmerged"
                times.setdefault(width, {}).setdefault(tokens, {})[path] = row.ms
        for width, by_tokens in sorted(times.items()):
            both = {t: v for t, v in sorted(by_tokens.items()) if len(v) == 2}
            if not both:
                continue
            first = next((t for t in both if all(w["merged"] <= w["unmerged"] for s, w in both.items() if s >= t)),
                         None)
            out[f"{kind} {width}"] = {"kind": kind, "width": width, "times_ms": both, "crossover_tokens": first,
                                      "suggested_MERGE_CROSSOVER": first / width if first else None,
                                      "beyond": max(both) / width if both else None}
    return out


def suggested_crossovers(cross: dict[str, Any]) -> dict[str, float | None]:
    """The constants of minilora.fast from the crossover table: the largest suggestion over widths; a width
    where merged never won counts as 2 x (largest N measured / width)."""
    out: dict[str, float | None] = {}
    for kind in CROSSOVER_KINDS:
        values = [c["suggested_MERGE_CROSSOVER"] if c["crossover_tokens"] is not None else 2 * c["beyond"]
                  for c in cross.values() if c["kind"] == kind and c["beyond"] is not None]
        out[kind] = max(values) if values else None
    return out


def _crossover_text(cross: dict[str, Any]) -> str:
    lines = []
    for key, c in cross.items():
        ms = " ".join(f"{t}:{v['merged']:.3f}/{v['unmerged']:.3f}" for t, v in c["times_ms"].items())
        where = (f"merged from N={c['crossover_tokens']} (= {c['suggested_MERGE_CROSSOVER']:.3g} x width)"
                 if c["crossover_tokens"] else f"unmerged at every N up to {c['beyond']:.3g} x width")
        lines.append(f"# crossover {key}: {where}; ms merged/unmerged {ms}")
    s = suggested_crossovers(cross)
    names = {"LoRA": "fast.MERGE_CROSSOVER", "QLoRA": "fast.MERGE_CROSSOVER_FREE_BUILD",
             "QLoRA torch build": "fast.MERGE_CROSSOVER (NF4 bases, if TRITON_BUILD['nf4'] = False)"}
    for kind, value in s.items():
        if value is not None:
            lines.append(f"# SET {names[kind]} = {value:.3g}   (from crossover {kind})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Section 2: NF4 quantize / dequantize


def _nf4_bytes(n: int, double_quant: bool, out_bytes: int = 2) -> int:
    """Bytes a dequantization must move: codes + scales in, values out (quantization: the same, reversed)."""
    n_blocks = -(-n // 64)
    scales = n_blocks + 4 * -(-n_blocks // 256) if double_quant else 4 * n_blocks
    return n // 2 + scales + out_bytes * n


def _same_nf4(a: Any, b: Any) -> dict[str, int]:
    """Element counts that differ between two NF4Tensors: packed bytes, code nibbles, scales."""
    diff = {"bytes": int((a.packed != b.packed).sum()),
            "nibbles": int(((a.packed >> 4) != (b.packed >> 4)).sum() + ((a.packed & 15) != (b.packed & 15)).sum())}
    if a.double_quant:
        diff["absmax_codes"] = int((a.absmax.codes != b.absmax.codes).sum())
        diff["absmax_scales"] = int((a.absmax.scales != b.absmax.scales).sum())
        diff["offset"] = int(a.absmax.offset != b.absmax.offset)
    else:
        diff["absmax"] = int((a.absmax != b.absmax).sum())
    return diff


def time_rotating(fns: list[Callable[[], object]], *, warmup: int, reps: int,
                  device: torch.device) -> dict[str, Any]:
    """Time `reps` calls cycling through `fns` (the same operation on K distinct inputs): median, quartiles.

    With K inputs whose bytes together exceed the GPU's L2 cache (50 MB on an H100), every call reads data
    that the K − 1 calls before it have evicted, as a layer's weights are in a model; timing one buffer over
    and over measures a partly cached, easier case, and how much of it is cached varies from run to run.
    CUDA: a pair of events around each call; CPU: perf_counter.
    """
    if reps < 1 or not fns:
        raise ValueError("need reps >= 1 and at least one function")
    for i in range(warmup):
        fns[i % len(fns)]()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for i, (start, end) in enumerate(pairs):
            start.record()
            fns[i % len(fns)]()
            end.record()
        torch.cuda.synchronize(device)
        times, clock = [s.elapsed_time(e) for s, e in pairs], "cuda-events"
    else:
        times = []
        for i in range(reps):
            t0 = time.perf_counter()
            fns[i % len(fns)]()
            times.append((time.perf_counter() - t0) * 1e3)
        clock = "perf_counter"
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
    return {"median_ms": statistics.median(times), "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1,
            "min_ms": min(times), "max_ms": max(times), "reps": reps, "buffers": len(fns), "clock": clock}


def _timed(row: Row, fns: list[Callable[[], object]], cfg: Settings, reps: int) -> None:
    """Time into a row: ms = median; the spread (quartiles, IQR, min, max, reps, buffers) into row.info."""
    spread = time_rotating(fns, warmup=cfg.warmup, reps=reps, device=cfg.device)
    row.ms = spread["median_ms"]
    row.info.update(spread)


def _nf4_plan(cfg: Settings) -> tuple[int, int]:
    """(distinct input buffers, timed calls) of each nf4 row."""
    if cfg.device.type != "cuda":
        return 2, cfg.reps
    return NF4_BUFFERS, NF4_REPS[1] if cfg.quick else NF4_REPS[0]


def nf4_section(cfg: Settings, copy_tbps: float | None) -> list[Row]:
    from minilora.double_quant import double_quantize, from_bnb

    try:
        import bitsandbytes.functional as bnbF
    except ImportError:  # bitsandbytes' rows then fail one by one; minilora's still run
        bnbF = None

    rows: list[Row] = []
    dev = cfg.device
    triton_ok = kernels.triton_usable(dev)
    shapes = [(4096, 4096), (8192, 8192), (14336, 4096)] if dev.type == "cuda" else CPU_NF4_SHAPES
    if dev.type == "cuda" and cfg.quick:
        shapes = [(8192, 8192)]
    n_buffers, reps = _nf4_plan(cfg)

    def bandwidth(row: Row, n: int, dq: bool) -> None:
        if row.ms:
            tbps = _nf4_bytes(n, dq) / (row.ms * 1e-3) / 1e12
            row.info["TBps"] = tbps
            if copy_tbps:
                row.info["fraction_of_copy"] = tbps / copy_tbps

    for shape in shapes:
        cfg_name = f"{shape[0]}x{shape[1]}"
        n = shape[0] * shape[1]
        torch.manual_seed(4)
        ws = [torch.randn(shape, device=dev, dtype=DTYPE) for _ in range(n_buffers)]  # w = ws[0] is checked
        w = ws[0]
        for dq in (False, True):
            tag = f"{cfg_name}{' DQ' if dq else ''}"
            state: dict[str, Any] = {}

            def bnb_quant(row: Row) -> None:
                if bnbF is None:
                    raise RuntimeError("bitsandbytes is not installed")
                raw = [bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=dq) for x in ws]
                state["bnb_raw_all"] = raw
                state["bnb_raw"] = raw[0]
                state["bnb_all"] = [from_bnb(packed, qs) for packed, qs in raw]
                state["bnb"] = state["bnb_all"][0]
                deq = bnbF.dequantize_4bit(*raw[0])
                row.err = _rel(deq, w)  # quantization error ‖W − deq‖/‖W‖ (anchor: 0.0920)
                _timed(row, [lambda x=x: bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4",
                                                             compress_statistics=dq) for x in ws], cfg, reps)
                bandwidth(row, n, dq)
                state["bnb_quant_ms"] = row.ms

            def ours_quant(row: Row) -> None:
                if not triton_ok:
                    row.status = "skipped (no Triton on this device)"
                    return
                got = kernels.quantize_nf4_triton(w, 64, dq)
                ref = quantize_nf4(w, 64, dq)  # minilora.nf4 in PyTorch, same device
                row.info["diff_vs_minilora_nf4"] = d = _same_nf4(got, ref)
                if "bnb" in state:
                    row.info["diff_vs_bnb"] = _same_nf4(got, state["bnb"])
                if any(d.values()):
                    row.status = "MISMATCH"
                    return
                row.err = 0.0
                _timed(row, [lambda x=x: kernels.quantize_nf4_triton(x, 64, dq, check_finite=False) for x in ws],
                       cfg, reps)
                bandwidth(row, n, dq)
                if state.get("bnb_quant_ms"):
                    row.ratio = row.ms / state["bnb_quant_ms"]
                if dev.type == "cuda" and not dq and "bnb" in state:
                    # which reciprocal does bitsandbytes' CUDA kernel use? count code differences for each
                    for rounding in ("rcp_approx", "div_full"):
                        try:
                            alt = kernels.quantize_nf4_triton(w, 64, False, rounding=rounding, check_finite=False)
                            row.info[f"diff_vs_bnb_{rounding}"] = _same_nf4(alt, state["bnb"])
                        except Exception as err:  # noqa: BLE001
                            row.info[f"diff_vs_bnb_{rounding}"] = repr(err)[:200]
                if dq and "bnb" in state:
                    row.info["dq_rules_vs_bnb"] = _dq_rules_vs_bnb(got, state["bnb"], w)

            def dq_stage(row: Row) -> None:
                # the 8-bit stage alone on the n/64 block scales: minilora's mean + one kernel
                absmaxes = [kernels.quantize(x, 64, False).absmax for x in ws]
                _timed(row, [lambda a=a: double_quantize(a) for a in absmaxes], cfg, reps)

            def bnb_dq_stage(row: Row) -> None:
                if bnbF is None:
                    raise RuntimeError("bitsandbytes is not installed")
                absmaxes = [kernels.quantize(x, 64, False).absmax for x in ws]

                def run(a: Tensor) -> object:  # what quantize_4bit(compress_statistics=True) does after the 4-bit step
                    offset = a.mean()
                    return bnbF.quantize_blockwise(a - offset, blocksize=256), offset

                _timed(row, [lambda a=a: run(a) for a in absmaxes], cfg, reps)
                state["bnb_dq_ms"] = row.ms

            def bnb_dequant(row: Row) -> None:
                _timed(row, [lambda r=r: bnbF.dequantize_4bit(*r) for r in state["bnb_raw_all"]], cfg, reps)
                bandwidth(row, n, dq)
                state["bnb_deq_ms"] = row.ms

            def ours_dequant(row: Row) -> None:
                if not triton_ok:
                    row.status = "skipped (no Triton on this device)"
                    return
                # bitsandbytes' own bytes where it ran: then the outputs must be identical to its output too
                qs = state["bnb_all"] if "bnb_all" in state else [kernels.quantize_nf4_triton(x, 64, dq) for x in ws]
                q = qs[0]
                out = kernels.dequantize_nf4_triton(q, DTYPE)
                ref_torch = dequantize_nf4(q, DTYPE)
                row.info["bitwise_equal_minilora_nf4"] = bool(torch.equal(out, ref_torch))
                ok = row.info["bitwise_equal_minilora_nf4"]
                if "bnb_raw" in state:
                    ref = bnbF.dequantize_4bit(*state["bnb_raw"])
                    row.info["bitwise_equal_bnb"] = bool(torch.equal(out, ref.reshape(out.shape)))
                    ok = ok and row.info["bitwise_equal_bnb"]
                if not ok:
                    row.status = "MISMATCH"
                    row.err = _rel(out, ref_torch)
                    return
                row.err = 0.0
                del out, ref_torch
                _timed(row, [lambda q=q: kernels.dequantize_nf4_triton(q, DTYPE) for q in qs], cfg, reps)
                bandwidth(row, n, dq)
                if state.get("bnb_deq_ms"):
                    row.ratio = row.ms / state["bnb_deq_ms"]

            def torch_dequant(row: Row) -> None:
                qs = state["bnb_all"] if "bnb_all" in state else [quantize_nf4(x, 64, dq) for x in ws]
                _timed(row, [lambda q=q: dequantize_nf4(q, DTYPE) for q in qs], cfg, min(reps, 10))
                bandwidth(row, n, dq)
                if state.get("bnb_deq_ms"):
                    row.ratio = row.ms / state["bnb_deq_ms"]

            bodies = [("bnb quantize_4bit", bnb_quant), ("minilora quantize (Triton)", ours_quant)]
            if dq:
                bodies += [("bnb DQ stage (mean + quantize_blockwise)", bnb_dq_stage),
                           ("minilora double_quantize", dq_stage)]
            bodies += [("bnb dequantize_4bit", bnb_dequant), ("minilora dequantize (Triton)", ours_dequant),
                       ("minilora dequantize (PyTorch)", torch_dequant)]
            for name, body in bodies:
                _guard(rows, Row("nf4", name, tag), body, dev)
                if name == "minilora double_quantize" and rows[-1].ms and state.get("bnb_dq_ms"):
                    rows[-1].ratio = rows[-1].ms / state["bnb_dq_ms"]
            state.clear()
        if triton_ok and shape == ((8192, 8192) if dev.type == "cuda" else shapes[-1]):
            rows += _nf4_tuning(cfg, ws)
        del w, ws
        _free(dev)
    rows += _lora_weight_rows(cfg)
    return rows


def _dq_rules_vs_bnb(ours: Any, theirs: Any, w: Tensor) -> dict[str, Any]:
    """8-bit scale codes differing from bitsandbytes' for each rounding rule of `blockwise_8bit_triton`, on the
    same 4-bit block scales: "grid" is the CPU rule minilora stores; "search" is the CUDA kernel's search."""
    absmax = kernels.quantize_nf4_triton(w, 64, False, check_finite=False).absmax
    variants = [("grid", "exact"), ("nearest", "exact"), ("search", "exact")]
    if w.device.type == "cuda":
        variants += [("search", "rcp_approx"), ("search", "div_full")]
    out: dict[str, Any] = {"n_codes": int(theirs.absmax.codes.numel())}
    for rule, rounding in variants:
        try:
            got = kernels.double_quantize_triton(absmax, rule=rule, rounding=rounding)
            out[f"{rule} {rounding}"] = int((got.codes != theirs.absmax.codes).sum())
        except Exception as err:  # noqa: BLE001
            out[f"{rule} {rounding}"] = repr(err)[:200]
    return out


def _nf4_tuning(cfg: Settings, ws: list[Tensor]) -> list[Row]:
    """Time the dequantize / quantize kernels at a few block sizes and warp counts (DQ on)."""
    rows: list[Row] = []
    dev = cfg.device
    w = ws[0]
    qs = [kernels.quantize_nf4_triton(x, 64, True) for x in ws]
    q = qs[0]
    ref = dequantize_nf4(q, DTYPE)
    _, reps = _nf4_plan(cfg)
    configs = [(b, nw) for b in (1024, 2048, 4096, 8192) for nw in (4, 8)]
    if dev.type != "cuda" or cfg.quick:
        configs = configs[2:4]
    for block, num_warps in configs:
        def deq(row: Row, block: int = block, num_warps: int = num_warps) -> None:
            out = kernels.dequantize_nf4_triton(q, DTYPE, block=block, num_warps=num_warps)
            if not torch.equal(out, ref):
                row.status = "MISMATCH"
                return
            _timed(row, [lambda q=q: kernels.dequantize_nf4_triton(q, DTYPE, block=block, num_warps=num_warps)
                         for q in qs], cfg, reps)

        def quant(row: Row, block: int = block, num_warps: int = num_warps) -> None:
            got = kernels.quantize_nf4_triton(w, 64, True, block=block, num_warps=num_warps)
            if any(_same_nf4(got, q).values()):
                row.status = "MISMATCH"
                return
            _timed(row, [lambda x=x: kernels.quantize_nf4_triton(x, 64, True, check_finite=False, block=block,
                                                                 num_warps=num_warps) for x in ws], cfg, reps)

        tag = f"{tuple(w.shape)} b{block} w{num_warps}"
        _guard(rows, Row("tuning", "dequantize DQ (Triton)", tag), deq, dev)
        _guard(rows, Row("tuning", "quantize DQ (Triton)", tag), quant, dev)
    return rows


def _lora_weight_rows(cfg: Settings) -> list[Row]:
    """W' = deq(W) + s·B A: the one-pass Triton build vs dequantize + addmm, at QLoRA's shapes."""
    rows: list[Row] = []
    dev = cfg.device
    if not kernels.triton_usable(dev):
        return rows
    shapes = [(4096, 4096), (14336, 4096), (4096, 14336)] if dev.type == "cuda" else [(96, 256)]
    if dev.type == "cuda" and cfg.quick:
        shapes = shapes[:1]
    for out_f, in_f in shapes:
        torch.manual_seed(5)
        q = kernels.quantize_nf4_triton(torch.randn(out_f, in_f, device=dev, dtype=DTYPE), 64, True)
        A = torch.randn(R, in_f, device=dev, dtype=DTYPE) / math.sqrt(in_f)
        B = torch.randn(out_f, R, device=dev, dtype=DTYPE) * 0.1
        ref = dequantize_nf4(q, torch.float32) + 2.0 * B.float() @ A.float()
        state: dict[str, float] = {}
        tag = f"{out_f}x{in_f} r{R}"

        def torch_build(row: Row) -> None:
            fn = lambda: kernels.dequantize(q, DTYPE).addmm_(B, A, alpha=2.0)  # noqa: E731
            row.err = _rel(fn(), ref)
            row.ms = time_fn(fn, warmup=cfg.warmup, reps=cfg.reps, device=dev).median_ms
            state["torch"] = row.ms

        def configs() -> list[tuple[int, int, int]]:
            if dev.type != "cuda" or cfg.quick:
                return [(32, 256, 4)]
            return [(bm, bn, nw) for bm in (16, 32, 64) for bn in (128, 256) for nw in (4, 8)]

        _guard(rows, Row("build", "deq + addmm_ (PyTorch)", tag), torch_build, dev)
        for bm, bn, nw in configs():
            def triton_build(row: Row, bm: int = bm, bn: int = bn, nw: int = nw) -> None:
                fn = lambda: kernels.nf4_lora_weight_triton(q, A, B, 2.0, DTYPE, bm=bm, bn=bn, num_warps=nw)  # noqa: E731
                row.err = _rel(fn(), ref)
                if not row.err <= 1e-2:
                    row.status = "MISMATCH"
                    return
                row.ms = time_fn(fn, warmup=cfg.warmup, reps=cfg.reps, device=dev).median_ms
                if state.get("torch"):
                    row.ratio = row.ms / state["torch"]
                row.info["TBps"] = (q.numel // 2 + q.n_blocks + 2 * q.numel) / (row.ms * 1e-3) / 1e12
            _guard(rows, Row("build", f"Triton deq+sBA bm{bm} bn{bn} w{nw}", tag), triton_build, dev)
        del q, A, B, ref
        _free(dev)
    return rows


# ---------------------------------------------------------------------------------------------------------
# Section: buildsweep — the W' = W0 + s·B A build, Triton configurations vs PyTorch vs a copy


BUILD_SHAPES = [(4096, 4096), (8192, 8192), (14336, 4096)]  # (out, in) on a GPU
CPU_BUILD_SHAPES = [(64, 256)]
BUILD_GRID = {"variant": ("outer", "dot"), "bm": (16, 32, 64), "bn": (128, 256), "num_warps": (4, 8)}
BUILD_BUFFERS, BUILD_REPS = 3, (30, 10)  # distinct weights per row (3 x 34+ MB > the 50 MB L2); timed calls
SWEEP_BUDGET_S = 100.0  # buildsweep stops adding Triton configurations after this many seconds (GPU)
PATHS_PLAN = {4096: [256, 1024, 2048, 4096, 8192, 16384], 8192: [1024, 4096, 8192, 16384]}
PATHS_REPS = 20  # timed calls per paths row on a GPU (the rows at 8192² x 16384 tokens take ~8 ms each)


def time_queued(fns: list[Callable[[], object]], *, warmup: int, reps: int, device: torch.device) -> dict[str, Any]:
    """GPU time of each call with the host out of the picture: like `time_rotating`, but on CUDA the calls are
    queued behind a spin kernel (torch.cuda._sleep) long enough for the host to issue all of them, so each
    event pair brackets the kernel alone, not the launch latency of a slow host. CPU: `time_rotating`."""
    if device.type != "cuda":
        return time_rotating(fns, warmup=warmup, reps=reps, device=device)
    for i in range(max(warmup, 1)):
        fns[i % len(fns)]()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for i in range(len(fns)):
        fns[i]()
    host_s = (time.perf_counter() - t0) / len(fns)  # an upper bound of the host's time per call
    torch.cuda.synchronize(device)
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    spin = int(min(0.5, 3 * reps * host_s + 2e-3) * 2.0e9)  # cycles at ≤ 2 GHz: ≥ 3x the time to queue
    torch.cuda._sleep(spin)
    queued_at = time.perf_counter()
    for i, (start, end) in enumerate(pairs):
        start.record()
        fns[i % len(fns)]()
        end.record()
    queue_s = time.perf_counter() - queued_at
    torch.cuda.synchronize(device)
    times = [s.elapsed_time(e) for s, e in pairs]
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
    return {"median_ms": statistics.median(times), "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1,
            "min_ms": min(times), "max_ms": max(times), "reps": reps, "buffers": len(fns),
            "clock": "cuda-events, queued", "host_ms_per_call": 1e3 * queue_s / reps,
            "spin_ms": spin / 2.0e6}


def _build_grid(cfg: Settings) -> list[dict[str, Any]]:
    """Triton build configurations to try: the full grid on a GPU, one per variant on a CPU / with --quick."""
    if cfg.device.type != "cuda" or cfg.quick:
        return [{"variant": v, "bm": 16, "bn": 128, "num_warps": 4} for v in BUILD_GRID["variant"]]
    return [{"variant": v, "bm": bm, "bn": bn, "num_warps": nw} for v in BUILD_GRID["variant"]
            for bm in BUILD_GRID["bm"] for bn in BUILD_GRID["bn"] for nw in BUILD_GRID["num_warps"]]


def _config_tag(c: dict[str, Any]) -> str:
    return f"{c['variant']} bm{c['bm']} bn{c['bn']} w{c['num_warps']}"


def buildsweep_section(cfg: Settings, copy_tbps: float | None) -> list[Row]:
    """W' = W0 + s·B A (r = R, s = 2) for a dense bf16 W0 and an NF4+DQ one: every Triton configuration of
    BUILD_GRID, the PyTorch build (addmm / dequantize + addmm_), and a copy of W0's bf16 bytes (the
    bandwidth yardstick), each on BUILD_BUFFERS distinct weights. A row is timed only after its output
    agrees with the float32 evaluation (relative error ≤ 3e-3, the kernel tests' bound)."""
    rows: list[Row] = []
    dev = cfg.device
    shapes = BUILD_SHAPES if dev.type == "cuda" else CPU_BUILD_SHAPES
    reps = BUILD_REPS[1] if cfg.quick or dev.type != "cuda" else BUILD_REPS[0]
    n_buf = BUILD_BUFFERS if dev.type == "cuda" else 2
    triton_ok = kernels.triton_usable(dev)
    grid = _build_grid(cfg)
    started = time.time()
    for out_f, in_f in shapes:
        torch.manual_seed(6)
        w0s = [torch.randn(out_f, in_f, device=dev, dtype=DTYPE) * 0.02 for _ in range(n_buf)]
        A = torch.randn(R, in_f, device=dev, dtype=DTYPE) / math.sqrt(in_f)
        B = torch.randn(out_f, R, device=dev, dtype=DTYPE) * 0.1
        low_rank = 2.0 * B.float() @ A.float()
        n = out_f * in_f
        tag = f"{out_f}x{in_f} r{R}"

        def copy_row(row: Row) -> None:
            dst = torch.empty_like(w0s[0])
            _timed_queued(row, [lambda w=w: dst.copy_(w) for w in w0s], cfg, reps)
            row.info["bytes"] = 4 * n
            row.info["TBps"] = 4 * n / (row.ms * 1e-3) / 1e12

        _guard(rows, Row("buildsweep", "copy bf16 W0", tag), copy_row, dev)
        copy_ms = rows[-1].ms
        for kind in ("dense", "nf4"):
            if kind == "dense":
                bases: list[Any] = w0s
                ref = w0s[0].float() + low_rank
                n_bytes = 4 * n
                torch_fn = lambda w: torch.addmm(w, B, A, alpha=2.0)  # noqa: E731
            else:
                bases = [kernels.quantize(w, 64, True) for w in w0s]
                ref = dequantize_nf4(bases[0], torch.float32) + low_rank
                n_bytes = _nf4_bytes(n, True)
                torch_fn = lambda q: kernels.dequantize(q, DTYPE).addmm_(B, A, alpha=2.0)  # noqa: E731
            label = "dense" if kind == "dense" else "NF4+DQ"

            def measure(row: Row, fn: Callable[[Any], Tensor]) -> None:
                row.err = _rel(fn(bases[0]), ref)
                if not row.err <= 3e-3:
                    row.status = "MISMATCH"
                    return
                _timed_queued(row, [lambda b=b: fn(b) for b in bases], cfg, reps)
                row.info["bytes"] = n_bytes
                row.info["TBps"] = n_bytes / (row.ms * 1e-3) / 1e12
                if copy_tbps:
                    row.info["fraction_of_copy"] = row.info["TBps"] / copy_tbps
                if copy_ms:
                    row.info["copy_ms"] = copy_ms

            _guard(rows, Row("buildsweep", f"{label} torch build", tag), lambda row: measure(row, torch_fn), dev)
            torch_ms = rows[-1].ms
            if not triton_ok:
                continue
            triton_fn = kernels.dense_lora_weight_triton if kind == "dense" else (
                lambda q, a, b, s, **kw: kernels.nf4_lora_weight_triton(q, a, b, s, DTYPE, **kw))
            for c in grid:
                row = Row("buildsweep", f"{label} Triton {_config_tag(c)}", tag, info={"config": dict(c)})
                if dev.type == "cuda" and time.time() - started > SWEEP_BUDGET_S:
                    row.status = "skipped (time budget)"
                    rows.append(row)
                    continue

                def body(row: Row, c: dict[str, Any] = c) -> None:
                    measure(row, lambda w: triton_fn(w, A, B, 2.0, **c))
                    if row.ms and torch_ms:
                        row.ratio = row.ms / torch_ms

                _guard(rows, row, body, dev)
            del bases, ref
        del w0s, A, B, low_rank
        _free(dev)
    return rows


def _timed_queued(row: Row, fns: list[Callable[[], object]], cfg: Settings, reps: int) -> None:
    spread = time_queued(fns, warmup=cfg.warmup, reps=reps, device=cfg.device)
    row.ms = spread["median_ms"]
    row.info.update(spread)


def build_summary(rows: list[Row]) -> dict[str, Any]:
    """Per (kind, shape): the fastest Triton configuration, the torch build and the copy; per kind the one
    configuration with the smallest geometric mean of time / that shape's fastest (LORA_WEIGHT_CONFIG[kind])
    and whether Triton beats the torch build (geometric mean of best Triton / torch < 1: TRITON_BUILD[kind])."""
    copy = {r.config: r.ms for r in rows if r.section == "buildsweep" and r.name == "copy bf16 W0" and r.ms}
    out: dict[str, Any] = {"shapes": [], "kinds": {}}
    for kind, label in (("dense", "dense"), ("nf4", "NF4+DQ")):
        per_shape: dict[str, dict[str, Row]] = {}
        torch_ms: dict[str, float] = {}
        for r in rows:
            if r.section != "buildsweep" or r.ms is None or r.status != "ok":
                continue
            if r.name == f"{label} torch build":
                torch_ms[r.config] = r.ms
            elif r.name.startswith(f"{label} Triton "):
                per_shape.setdefault(r.config, {})[_config_tag(r.info["config"])] = r
        for shape, by_cfg in per_shape.items():
            best = min(by_cfg.values(), key=lambda r: r.ms)
            out["shapes"].append({"kind": kind, "shape": shape, "best": _config_tag(best.info["config"]),
                                  "best_ms": best.ms, "TBps": best.info.get("TBps"),
                                  "fraction_of_copy": best.info.get("fraction_of_copy"),
                                  "torch_ms": torch_ms.get(shape), "copy_ms": copy.get(shape)})
        common = set.intersection(*(set(v) for v in per_shape.values())) if per_shape else set()
        if not common:
            continue
        best_ms = {s: min(r.ms for r in v.values()) for s, v in per_shape.items()}
        score = {t: math.exp(statistics.fmean(math.log(per_shape[s][t].ms / best_ms[s]) for s in per_shape))
                 for t in common}
        chosen = min(score, key=score.get)
        config = next(iter(per_shape.values()))[chosen].info["config"]
        vs_torch = [best_ms[s] / torch_ms[s] for s in per_shape if s in torch_ms]
        geo = math.exp(statistics.fmean(math.log(v) for v in vs_torch)) if vs_torch else None
        out["kinds"][kind] = {"config": config, "slowdown_vs_best": score[chosen], "triton_over_torch": geo,
                              "use_triton": geo is not None and geo < 1.0}
    return out


def _build_summary_text(summary: dict[str, Any]) -> str:
    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = ["# buildsweep: W' = W0 + s·B A, fastest Triton configuration per shape (ms; TB/s; share of copy)"]
    for e in summary["shapes"]:
        lines.append(f"#   {e['kind']:5} {e['shape']:17} best {e['best']:24} {f(e['best_ms'], '.4f')} ms "
                     f"{f(e['TBps'], '.2f')} TB/s {f(e['fraction_of_copy'], '.0%')} of copy | torch build "
                     f"{f(e['torch_ms'], '.4f')} ms | copy {f(e['copy_ms'], '.4f')} ms")
    for kind, k in summary["kinds"].items():
        lines.append(f"# SET LORA_WEIGHT_CONFIG[{kind!r}] = {k['config']}   "
                     f"(geomean time / per-shape best {k['slowdown_vs_best']:.3f})")
        lines.append(f"# SET fast.TRITON_BUILD[{kind!r}] = {k['use_triton']}   "
                     f"(geomean best Triton / torch build {f(k['triton_over_torch'], '.3f')})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Section: paths — merged vs unmerged, widths 4096 and 8192


def paths_section(cfg: Settings) -> list[Row]:
    """Forward + backward of the fused LoRA and QLoRA layers on both paths (QLoRA merged with the Triton
    build and with the torch build) over PATHS_PLAN, next to the frozen bf16 Linear of the same N."""
    rows: list[Row] = []
    dev = cfg.device
    cfg = Settings(dev, cfg.quick, cfg.warmup, min(cfg.reps, PATHS_REPS))
    plan = PATHS_PLAN if dev.type == "cuda" else {w: ts for w, ts in CPU_LAYER_PLAN}
    if dev.type == "cuda" and cfg.quick:
        plan = {4096: [1024, 8192]}
    for width, token_list in plan.items():
        torch.manual_seed(1)
        A = torch.empty(R, width, device=dev)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        B = torch.empty(width, R, device=dev)
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        try:
            builders, shared = _layer_cases(width, dev, A, B, 1 + 0.1 * torch.randn(width, device=dev), seed=2)
        except Exception as err:  # noqa: BLE001
            rows.append(Row("paths", "setup", f"{width}x{width}", status="error", info={"error": repr(err)[:500]}))
            continue
        chosen = {"frozen bf16 nn.Linear": builders["frozen bf16 nn.Linear"], **shared["path_builders"]}
        baseline: dict[tuple[int, int], float] = {}
        for tokens in token_list:
            torch.manual_seed(3)
            x = torch.randn(tokens, width, device=dev, dtype=DTYPE, requires_grad=True)
            g = torch.randn(tokens, width, device=dev, dtype=DTYPE)
            for name, build in chosen.items():
                _run_layer_row(rows, cfg, name, build, tokens, width, x, g, A, B, shared, baseline, "paths")
            del x, g
        del builders, shared, chosen
        _free(dev)
    return rows


# ---------------------------------------------------------------------------------------------------------
# Section 3: training steps


LLAMA_SHAPES = {
    "1B": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "8B": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}


def _build_llama(shape: str, device: torch.device, seq: int) -> nn.Module:
    """A Llama-architecture model with RANDOM weights, built directly on `device` in bf16."""
    import transformers

    config = transformers.LlamaConfig(**LLAMA_SHAPES[shape], max_position_embeddings=max(seq, 128),
                                      attn_implementation="sdpa")
    torch.manual_seed(6)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=DTYPE)
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
    from minilora.inject import lora_layers

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
    from minilora.inject import inject
    from minilora.qlora import quantize_model

    model = _build_llama(shape, device, seq)
    if kind == "peft":
        from peft import LoraConfig, get_peft_model

        _to_bnb_4bit(model, device)
        model.is_loaded_in_4bit = True  # as from_pretrained(quantization_config=...) would mark it, for PEFT
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    else:
        quantize_model(model, blocksize=64, double_quant=True, compute_dtype=DTYPE)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        inject(model, target_modules="all-linear", r=R, lora_alpha=ALPHA)
        _use_fused(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params


def train_section(cfg: Settings) -> list[Row]:
    rows: list[Row] = []
    dev = cfg.device
    batch, seq = (4, 1024) if dev.type == "cuda" else (2, 32)
    shapes = (["1B"] if cfg.quick else ["1B", "8B"]) if dev.type == "cuda" else ["tiny"]
    warmup, reps = (1, 3) if cfg.quick or dev.type != "cuda" else (3, 8)
    for shape in shapes:
        losses: dict[str, float] = {}
        peaks: dict[str, float] = {}
        speed: dict[str, float] = {}
        for kind, name in (("peft", "PEFT + bnb QLoRA"), ("minilora", "minilora fused QLoRA")):
            def body(row: Row, kind: str = kind) -> None:
                model, params = _setup_train(kind, shape, dev, seq)
                row.info["trainable_params"] = sum(p.numel() for p in params)
                if dev.type == "cuda":
                    row.info["weights_gib"] = torch.cuda.memory_allocated(dev) / 2**30
                opt = torch.optim.AdamW(params, lr=1e-4)
                torch.manual_seed(7)
                ids = torch.randint(0, LLAMA_SHAPES[shape]["vocab_size"], (batch, seq), device=dev)

                def step() -> Tensor:
                    loss = model(input_ids=ids, labels=ids).loss
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    return loss.detach()

                # agreement first: the loss before any update (B = 0: the 4-bit base model alone)
                with torch.no_grad():
                    losses[kind] = float(model(input_ids=ids, labels=ids).loss)
                row.info["loss_step0"] = losses[kind]
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                t = time_fn(step, warmup=warmup, reps=reps, device=dev)
                row.ms = t.median_ms
                row.info["tokens_per_s"] = batch * seq / (t.median_ms * 1e-3)
                speed[kind] = row.info["tokens_per_s"]
                row.info.update(min_ms=t.min_ms, max_ms=t.max_ms, reps=t.reps, batch=batch, seq=seq,
                                grad_checkpointing=bool(getattr(model, "is_gradient_checkpointing", True)))
                if dev.type == "cuda":
                    row.peak_mib = torch.cuda.max_memory_allocated(dev) / 2**20
                    peaks[kind] = row.peak_mib
                if "peft" in losses and kind == "minilora":
                    row.err = abs(losses["minilora"] - losses["peft"]) / abs(losses["peft"])
                    if not row.err <= 1e-2:
                        row.status = "MISMATCH (step-0 loss)"
                    row.ratio = speed["minilora"] / speed["peft"] if "peft" in speed else None
                    row.info["ratio_is"] = "tokens/s minilora / PEFT (higher is better)"
                    if "peft" in peaks and "minilora" in peaks:
                        row.info["peak_vs_peft"] = peaks["minilora"] / peaks["peft"]
                del model, params, opt, ids

            _guard(rows, Row("train", name, f"{shape} B{batch} S{seq}"), body, dev)
    return rows


# ---------------------------------------------------------------------------------------------------------
# Output


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in ("torch", "triton", "peft", "bitsandbytes", "transformers", "minilora"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["torch.version.cuda"] = torch.version.cuda
    return out


def _write_json(path: str, data: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def _plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layer_rows = [r for r in rows if r.section == "layers" and r.ratio is not None]
    nf4_rows = [r for r in rows if r.section == "nf4" and r.ms is not None]
    fig, axes = plt.subplots(1, 2, figsize=(16, 6))
    configs = sorted({r.config for r in layer_rows})
    names = list(dict.fromkeys(r.name for r in layer_rows))
    width = 0.8 / max(1, len(configs))
    for i, config in enumerate(configs):
        vals = [next((r.ratio for r in layer_rows if r.name == n and r.config == config), 0) for n in names]
        axes[0].barh([j + i * width for j in range(len(names))], vals, height=width, label=config)
    axes[0].set_yticks([j + 0.4 - width / 2 for j in range(len(names))], names, fontsize=7)
    axes[0].axvline(1.0, color="k", lw=0.8)
    axes[0].set_xlabel("time / frozen bf16 Linear (forward + backward)")
    axes[0].legend(fontsize=7)
    labels = [f"{r.name}\n{r.config}" for r in nf4_rows]
    axes[1].barh(range(len(nf4_rows)), [r.ms for r in nf4_rows])
    axes[1].set_yticks(range(len(nf4_rows)), labels, fontsize=5)
    axes[1].set_xlabel("ms")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _compact(row: Row) -> str:
    """One short line per row: name, size, time, ratio, a section-specific figure, error, status."""
    def f(v: float | None, fmt: str, width: int) -> str:
        return ("-" if v is None else format(v, fmt)).rjust(width)

    if row.section in ("nf4", "buildsweep"):
        extra = f(row.info.get("fraction_of_copy"), ".2f", 6) + " copy"
    elif row.section == "train":
        extra = f(row.info.get("tokens_per_s"), ".0f", 6) + " tok/s"
    elif row.section == "host":
        extra = f(row.info.get("ops"), "d", 6) + " ops"
    else:
        extra = f(row.peak_mib, ".0f", 6) + " MiB"
    status = row.status if row.status != "error" else "error: " + row.info.get("error", "")[:60]
    return (f"{row.name[:36]:36} {row.config[:18]:18} {f(row.ms, '.4f', 10)} ms {f(row.ratio, '.2f', 5)}x "
            f"{extra} {f(row.err, '.1e', 7)} {status}")


def _table(rows: list[Row]) -> str:
    """The summary printed last: every measured row except the tuning sweeps, then the best of each sweep."""
    lines = [f"{'name':36} {'size':18} {'time':>13} {'ratio':>6} {'mem/bw/speed':>11} {'err':>7} status"]
    section = None
    for r in rows:
        if r.section in ("tuning", "build", "paths", "buildsweep") and (r.status == "ok"
                                                                         or r.status.startswith("skipped")):
            continue
        if r.section != section:
            section = r.section
            lines.append(f"-- {section}")
        lines.append(_compact(r))
    best: dict[tuple[str, str, str], Row] = {}
    for r in rows:
        if r.section in ("tuning", "build") and r.ms is not None:
            key = (r.section, r.name.split(" bm")[0], r.config.split(" b")[0])
            if key not in best or r.ms < best[key].ms:
                best[key] = r
    if best:
        lines.append("-- fastest kernel configuration of each sweep")
        lines += [_compact(r) for r in best.values()]
    return "\n".join(lines)

# (figure, section, peer row, our row, config to match, kind, target): "ratio" rows compare ratios to the
# frozen Linear of the same run (lower is better), "speedup" rows compare the two times (higher is better).
TARGETS = [
    ("LoRA fwd+bwd / frozen Linear", "layers", "PEFT LoRA", "minilora fused LoRA", "4096x4096", "ratio", 1.25),
    ("DoRA fwd+bwd / frozen Linear", "layers", "PEFT DoRA", "minilora fused DoRA", "4096x4096", "ratio", 1.5),
    ("QLoRA NF4+DQ fwd+bwd / frozen Linear", "layers", "PEFT QLoRA (bnb NF4+DQ)", "minilora fused QLoRA",
     "4096x4096", "ratio", 1.6),
    ("NF4 dequantize 8192², speedup", "nf4", "bnb dequantize_4bit", "minilora dequantize (Triton)", "8192x8192",
     "speedup", 1.3),
    ("NF4+DQ dequantize 8192², speedup", "nf4", "bnb dequantize_4bit", "minilora dequantize (Triton)",
     "8192x8192 DQ", "speedup", 1.3),
    ("NF4 quantize 8192², speedup", "nf4", "bnb quantize_4bit", "minilora quantize (Triton)", "8192x8192",
     "speedup", 2.0),
    ("NF4+DQ quantize 8192², speedup", "nf4", "bnb quantize_4bit", "minilora quantize (Triton)", "8192x8192 DQ",
     "speedup", 2.0),
    ("8B QLoRA step tokens/s over PEFT+bnb", "train", "PEFT + bnb QLoRA", "minilora fused QLoRA", "8B", "speedup",
     1.3),
]


def targets(rows: list[Row]) -> list[dict[str, Any]]:
    """The target table: per figure the peer's and our value (largest token count for layer rows), met or not."""
    table = []
    for figure, section, peer_name, our_name, config, kind, target in TARGETS:
        def find(name: str) -> Row | None:
            found = [r for r in rows if r.section == section and r.name == name and r.ms is not None
                     and r.status == "ok" and (r.config.endswith(config) if section == "layers"
                                               else r.config == config if section == "nf4" else config in r.config)]
            # layers: the largest N (the figure of the targets); others: the only match
            return max(found, key=lambda r: int(r.config.split()[0][2:]) if section == "layers" else 0, default=None)

        peer, ours = find(peer_name), find(our_name)
        entry: dict[str, Any] = {"figure": figure, "peer": None, "ours": None, "target": target, "met": None,
                                 "config": None if ours is None else ours.config}
        if peer is not None and ours is not None:
            if kind == "ratio":
                entry["peer"], entry["ours"] = peer.ratio, ours.ratio
                entry["met"] = ours.ratio is not None and ours.ratio <= target
            elif section == "train":
                speed = ours.info.get("tokens_per_s", 0) / max(peer.info.get("tokens_per_s", 0), 1e-9)
                entry["peer"], entry["ours"] = 1.0, speed
                memory_ok = (ours.peak_mib or 0) <= (peer.peak_mib or float("inf"))
                entry["met"] = speed >= target and memory_ok
                entry["peak_mib"] = {"peer": peer.peak_mib, "ours": ours.peak_mib}
            else:
                entry["peer"], entry["ours"] = peer.ms, ours.ms
                entry["speedup"] = peer.ms / ours.ms
                entry["met"] = entry["speedup"] >= target
        table.append(entry)
    return table


def _targets_table(table: list[dict[str, Any]]) -> str:
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["# targets (layers: ratio to the frozen bf16 Linear of the same run; nf4: ms, speedup = peer/ours)",
             f"{'figure':40} {'peer':>9} {'ours':>9} {'speedup':>8} {'target':>7}  met?"]
    for e in table:
        lines.append(f"{e['figure']:40} {f(e['peer']):>9} {f(e['ours']):>9} {f(e.get('speedup')):>8} "
                     f"{f(e['target']):>7}  {'-' if e['met'] is None else 'yes' if e['met'] else 'NO'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minilora.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    parser.add_argument("--train", action="store_true", help="also time Llama-shaped training steps")
    parser.add_argument("--out", default="bench_out", help="directory for bench.json and bench.png")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--sections", default=None,
                        help="comma-separated subset of layers,nf4,host,train,buildsweep,paths")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    sections = set((args.sections or "layers,nf4,host" + (",train" if args.train else "")).split(","))
    unknown = sections - {"layers", "nf4", "host", "train", "buildsweep", "paths"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from layers, nf4, host, train, buildsweep, paths")
    if device.type == "cuda":
        cfg = Settings(device, args.quick, warmup=5, reps=10 if args.quick else 30)
    else:
        cfg = Settings(device, True, warmup=1, reps=2)

    for optional in ("peft", "bitsandbytes", "transformers", "matplotlib"):
        try:  # imported up front, so that gc.freeze() below covers their objects
            __import__(optional)
        except ImportError:
            print(f"# {optional} is not installed: its rows will report errors", flush=True)
    # Rows free their layers through gc (PEFT modules hold reference cycles); freezing the long-lived objects
    # of the imports keeps each collection fast.
    gc.collect()
    gc.freeze()
    env = environment(device)
    print(f"# minilora.bench on {env}", flush=True)
    started = time.time()
    results: dict[str, Any] = {"environment": env.as_dict(), "versions": _versions(), "argv": sys.argv[1:],
                               "settings": {"quick": cfg.quick, "warmup": cfg.warmup, "reps": cfg.reps,
                                            "rank": R, "alpha": ALPHA, "dtype": str(DTYPE), "tolerance": TOL,
                                            "MERGE_CROSSOVER": fast.MERGE_CROSSOVER,
                                            "DEQUANT_CONFIG": kernels.DEQUANT_CONFIG,
                                            "QUANT_CONFIG": kernels.QUANT_CONFIG,
                                            "LORA_WEIGHT_CONFIG": kernels.LORA_WEIGHT_CONFIG,
                                            "MERGE_CROSSOVER_FREE_BUILD": fast.MERGE_CROSSOVER_FREE_BUILD,
                                            "TRITON_BUILD": fast.TRITON_BUILD},
                               "triton_usable": kernels.triton_usable(device)}
    rows: list[Row] = []
    try:
        results["ceilings"] = measure_ceilings(cfg)
        print(f"# ceilings: {results['ceilings']}", flush=True)
    except Exception as err:  # noqa: BLE001
        results["ceilings"] = {"error": repr(err)[:500]}
    copy_tbps = results["ceilings"].get("copy_TBps")

    for section, run in (("buildsweep", lambda: buildsweep_section(cfg, copy_tbps)),
                         ("paths", lambda: paths_section(cfg)),
                         ("layers", lambda: layer_section(cfg)), ("nf4", lambda: nf4_section(cfg, copy_tbps)),
                         ("host", lambda: host_section(cfg)), ("train", lambda: train_section(cfg))):
        if section not in sections:
            continue
        t0 = time.time()
        try:
            rows += run()
        except Exception as err:  # noqa: BLE001 - the other sections still run
            rows.append(Row(section, "section", "-", status="error", info={"error": repr(err)[:500],
                                                                          "trace": traceback.format_exc()[-2000:]}))
        results.setdefault("section_seconds", {})[section] = time.time() - t0
        # written after every section, so a crash later keeps what was measured
        results["rows"] = [asdict(r) for r in rows]
        _write_json(os.path.join(args.out, "bench.json"), results)

    if sections & {"layers", "paths"}:
        results["crossover"] = crossover(rows)
        results["suggested"] = suggested_crossovers(results["crossover"])
    if "buildsweep" in sections:
        results["build_summary"] = build_summary(rows)
    results["rows"] = [asdict(r) for r in rows]
    results["targets"] = targets(rows)
    results["seconds"] = time.time() - started
    _write_json(os.path.join(args.out, "bench.json"), results)
    try:
        _plot(rows, os.path.join(args.out, "bench.png"))
    except Exception as err:  # noqa: BLE001
        print(f"# plot failed: {err!r}")
    print(f"\n# {env}\n# versions {results['versions']}\n# ceilings {results['ceilings']}")
    print(_table(rows))
    failed = [r for r in rows if r.status not in ("ok",) and not r.status.startswith("skipped")]
    print(f"# {len(rows)} rows, {len(failed)} not ok, {results['seconds']:.0f} s; wrote {args.out}/bench.json")
    print(_targets_table(results["targets"]))
    # last, the lines that set constants (bench/NOTES.md, "Setting the constants")
    if "build_summary" in results:
        print(_build_summary_text(results["build_summary"]))
    if results.get("crossover"):
        print(_crossover_text(results["crossover"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
