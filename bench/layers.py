"""Sections layers and host, and the merged/unmerged crossover.

layers: one layer's forward + backward (x requires grad, weights frozen, adapters trained) for minilora's
readable and fused layers next to PEFT's and bitsandbytes', each checked against a float32 evaluation of
the same formula before it is timed. host: the same rows at a toy size, where the time per call is the
host's. The crossover reads the `paths` rows (merged vs unmerged) that this section and `bench.sweep` add.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.common import ALPHA, DTYPE, TOL, R, Row, Settings, free, guard, peak, rel_err
from minilora import fast, from_bnb, kernels
from minilora.dora import NORM_EPS
from minilora.lora import LoRALinear
from minilora.nf4 import dequantize_nf4
from minilora.profiling import time_fn
from minilora.qlora import LinearNF4

# Toy sizes for --device cpu: (width, token counts), both sides of the merged/unmerged crossover (width 256)
CPU_LAYER_PLAN = [(256, [8, 300])]
# (tokens, width) of the host-overhead rows: small enough that the device work per operation is negligible
HOST_SHAPE = (16, 64)


@dataclass
class LayerCase:
    """A layer to time: y = fn(x); `params` are the trainable tensors in the order A, B[, m]."""

    fn: Callable[[Tensor], Tensor]
    params: list[Tensor]
    kind: str  # "frozen" | "lora" | "dora"
    quantized: bool
    module: nn.Module | None = None
    fast_flags: dict[str, Any] = field(default_factory=dict)  # minilora.fast settings for this row


# ---------------------------------------------------------------------------------------------------------
# The layers: PEFT's, minilora's readable and fused ones, on the same weights


class _Wrap(nn.Module):
    """A one-layer model, so that PEFT can find its target by name."""

    def __init__(self, lin: nn.Module) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)


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


def minilora_layer(base: nn.Module, use_dora: bool, A: Tensor, B: Tensor, m: Tensor | None) -> LoRALinear:
    """minilora's LoRALinear around `base`, with the adapter (A, B[, m]) copied in."""
    layer = LoRALinear(base, r=R, lora_alpha=ALPHA, use_dora=use_dora)
    with torch.no_grad():
        layer.lora_A["default"].copy_(A)
        layer.lora_B["default"].copy_(B)
        if use_dora:
            layer.lora_magnitude_vector["default"].copy_(m)
    return layer


def minilora_params(layer: LoRALinear) -> list[Tensor]:
    """The trainable tensors of a minilora layer, in the order A, B[, m]."""
    params = [layer.lora_A["default"], layer.lora_B["default"]]
    if layer.use_dora["default"]:
        params.append(layer.lora_magnitude_vector["default"])
    return params


def fused_fn(layer: LoRALinear, path: str | None = None) -> Callable[[Tensor], Tensor]:
    """x ↦ `fast.fused_forward(layer, x, path=path)`, which must not decline the layer."""
    def run(x: Tensor) -> Tensor:
        y = fast.fused_forward(layer, x, path=path)
        if y is None:
            raise RuntimeError("fast.fused_forward declined this layer")
        return y
    return run


class _SameOps(torch.autograd.Function):
    """The fused LoRA layer's unmerged operations and nothing else: no checks, no choices, no layer around them
    (the host section's floor for this sequence of operations). x: (N, in), w: (out, in) in the compute dtype;
    a32: (r, in), b32: (out, r) float32."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, a32: Tensor, b32: Tensor, s: float) -> Tensor:
        a, b = a32.to(x.dtype), b32.to(x.dtype)
        u = F.linear(x, a)
        y = F.linear(x, w).addmm_(u, b.t(), alpha=s)
        ctx.save_for_backward(x, w, a, b, u, a32, b32)
        ctx.s = s
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w, a, b, u, a32, b32 = ctx.saved_tensors
        s = ctx.s
        v = g.mm(b)
        grad_x = g.mm(w).addmm_(v, a, alpha=s)
        if g.is_cuda:  # cuBLAS writes the float32 gradients itself, as the fused layer has it do
            grad_a = torch.addmm(a32, v.t(), x, beta=0, alpha=s, out_dtype=torch.float32)
            grad_b = torch.addmm(b32, g.t(), u, beta=0, alpha=s, out_dtype=torch.float32)
        else:
            grad_a = torch.addmm(a, v.t(), x, beta=0, alpha=s)
            grad_b = torch.addmm(b, g.t(), u, beta=0, alpha=s)
        return grad_x, None, grad_a, grad_b, None


def adapter_weights(width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(A, B) of a square layer, seeded: A with PEFT's init, and a non-zero B (nn.Linear's init), so that
    the adapter counts."""
    torch.manual_seed(1)
    A = torch.empty(R, width, device=device)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    B = torch.empty(width, R, device=device)
    nn.init.kaiming_uniform_(B, a=math.sqrt(5))
    return A, B


def _bnb_and_nf4(base: nn.Linear, width: int, device: torch.device) -> tuple[nn.Module | None, Any]:
    """bitsandbytes' Linear4bit (NF4 + double quant) of `base`, and minilora's NF4Tensor of the same bytes;
    without bitsandbytes: None (its rows then fail one by one) and minilora's own quantization."""
    try:
        import bitsandbytes as bnb

        lin4 = bnb.nn.Linear4bit(width, width, bias=False, compute_dtype=DTYPE, compress_statistics=True,
                                 quant_type="nf4", device="meta")
        lin4.weight = bnb.nn.Params4bit(base.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                        compress_statistics=True, blocksize=64).to(device)
        return lin4, from_bnb(lin4.weight.data, lin4.weight.quant_state)
    except ImportError:
        return None, kernels.quantize(base.weight, 64, True)


@dataclass
class _Layers:
    """Makes the layers of one width, all from the same frozen weight and the same adapter (A, B, m)."""

    base: nn.Linear
    lin4: nn.Module | None  # bitsandbytes' Linear4bit of `base`; None without bitsandbytes
    q: Any  # the NF4Tensor every minilora 4-bit row loads (bitsandbytes' own bytes where it ran)
    A: Tensor
    B: Tensor
    m_dense: Tensor
    m_nf4: Tensor
    device: torch.device

    def nf4_base(self) -> LinearNF4:
        width = self.base.in_features
        layer = LinearNF4(width, width, bias=False, blocksize=64, double_quant=True, compute_dtype=DTYPE,
                          weight_dtype=DTYPE, device=self.device)
        layer.load_quantized(self.q)
        return layer

    def frozen(self, layer: nn.Module, quantized: bool) -> LayerCase:
        return LayerCase(layer, [], "frozen", quantized, layer)

    def peft(self, base: nn.Module | None, dora: bool, quantized: bool) -> LayerCase:
        if base is None:
            raise RuntimeError("bitsandbytes is not installed")
        layer = _peft_layer(base, dora)
        params = _set_peft_adapter(layer, self.A, self.B, (self.m_nf4 if quantized else self.m_dense) if dora else None)
        return LayerCase(layer, params, "dora" if dora else "lora", quantized, layer)

    def mini(self, base: nn.Module, dora: bool, quantized: bool, fused: bool, path: str | None = None,
             packed: bool = False) -> LayerCase:
        m = (self.m_nf4 if quantized else self.m_dense) if dora else None
        layer = minilora_layer(base, dora, self.A, self.B, m)
        layer.fused = None if fused else False  # the readable rows run the readable forward on CUDA too
        if packed:  # A, B cast once per optimizer step for the whole model, not in each call
            fast.pack_adapters(layer)
        fn = fused_fn(layer, path) if fused else layer
        return LayerCase(fn, minilora_params(layer), "dora" if dora else "lora", quantized, layer)

    def mini_module(self) -> LayerCase:
        """The fused LoRA layer called as a model calls it: the module, its forward, then the fused path."""
        layer = minilora_layer(self.base, False, self.A, self.B, None)
        layer.fused = True
        return LayerCase(layer, minilora_params(layer), "lora", False, layer)

    def same_ops(self) -> LayerCase:
        A, B = self.A.clone().requires_grad_(True), self.B.clone().requires_grad_(True)
        w = self.base.weight
        return LayerCase(lambda x: _SameOps.apply(x, w, A, B, ALPHA / R), [A, B], "lora", False)

    def mini_torch_build(self, dora: bool, path: str | None = None) -> LayerCase:
        case = self.mini(self.nf4_base(), dora, True, True, path)
        case.fast_flags = {"USE_TRITON_BUILD": False}  # dequantize, then addmm: the two-pass build
        return case


def _builders(mk: _Layers) -> dict[str, Callable[[], LayerCase]]:
    """The rows of the layer section, the frozen Linear first (every other row is a ratio to it)."""
    base, lin4 = mk.base, mk.lin4
    return {
        "frozen bf16 nn.Linear": lambda: mk.frozen(base, False),
        "PEFT LoRA": lambda: mk.peft(base, False, False),
        "minilora LoRALinear (readable)": lambda: mk.mini(base, False, False, False),
        "minilora fused LoRA": lambda: mk.mini(base, False, False, True),
        "minilora fused LoRA, packed": lambda: mk.mini(base, False, False, True, packed=True),
        "PEFT DoRA": lambda: mk.peft(base, True, False),
        "minilora LoRALinear DoRA (readable)": lambda: mk.mini(base, True, False, False),
        "minilora fused DoRA": lambda: mk.mini(base, True, False, True),
        "minilora fused DoRA, packed": lambda: mk.mini(base, True, False, True, packed=True),
        "bnb Linear4bit NF4+DQ (frozen)": lambda: (mk.frozen(lin4, True) if lin4 is not None
                                                   else mk.peft(None, False, True)),
        "minilora LinearNF4 NF4+DQ (frozen)": lambda: mk.frozen(mk.nf4_base(), True),
        "PEFT QLoRA (bnb NF4+DQ)": lambda: mk.peft(lin4, False, True),
        "minilora fused QLoRA": lambda: mk.mini(mk.nf4_base(), False, True, True),
        "minilora fused QLoRA, packed": lambda: mk.mini(mk.nf4_base(), False, True, True, packed=True),
        "minilora fused QLoRA, torch build": lambda: mk.mini_torch_build(False),
        "PEFT QDoRA (bnb NF4+DQ)": lambda: mk.peft(lin4, True, True),
        "minilora fused QDoRA": lambda: mk.mini(mk.nf4_base(), True, True, True),
        "minilora fused QDoRA, torch build": lambda: mk.mini_torch_build(True),
    }


def _path_builders(mk: _Layers) -> dict[str, Callable[[], LayerCase]]:
    """The fused layers forced onto one path each: the rows of the `paths` section."""
    return {
        "fused LoRA, merged": lambda: mk.mini(mk.base, False, False, True, "merged"),
        "fused LoRA, unmerged": lambda: mk.mini(mk.base, False, False, True, "unmerged"),
        "fused QLoRA, merged": lambda: mk.mini(mk.nf4_base(), False, True, True, "merged"),
        "fused QLoRA, unmerged": lambda: mk.mini(mk.nf4_base(), False, True, True, "unmerged"),
        "fused QLoRA, merged, torch build": lambda: mk.mini_torch_build(False, "merged"),
    }


def layer_cases(width: int, device: torch.device, A: Tensor, B: Tensor, m_factor: Tensor,
                seed: int) -> tuple[dict[str, Callable[[], LayerCase]], dict[str, Any]]:
    """The rows of the layer section, as builders (each row builds its own layer, then frees it), and what
    their checks share: float32 weights `w32` / `w32_nf4`, DoRA magnitudes `m_dense` / `m_nf4`, and the
    builders of the paths rows (`path_builders`)."""
    torch.manual_seed(seed)
    base = nn.Linear(width, width, bias=False, device=device, dtype=DTYPE).requires_grad_(False)
    lin4, q = _bnb_and_nf4(base, width, device)
    w_deq = dequantize_nf4(q, torch.float32)  # the effective weight of every 4-bit row (same bytes)

    def magnitude(dense: Tensor) -> Tensor:
        # PEFT's init value ‖W0 + s·BA‖_row, perturbed so that m/‖V‖ is not 1 and the check means something
        v = dense.float() + (ALPHA / R) * B.float() @ A.float()
        return torch.linalg.vector_norm(v, dim=1) * m_factor

    mk = _Layers(base, lin4, q, A, B, magnitude(base.weight), magnitude(w_deq), device)
    shared = {"w32": base.weight.float(), "w32_nf4": w_deq, "m_dense": mk.m_dense, "m_nf4": mk.m_nf4,
              "path_builders": _path_builders(mk),
              "host_builders": {"module": mk.mini_module, "same_ops": mk.same_ops}}
    return _builders(mk), shared


# ---------------------------------------------------------------------------------------------------------
# Check, then time


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


def check_case(case: LayerCase, x: Tensor, g: Tensor, w32: Tensor, A: Tensor, B: Tensor,
               m: Tensor | None) -> dict[str, float]:
    """Relative error of the case's output and of each gradient (y, dx, dA, dB[, dm]) against float32."""
    y = case.fn(x)
    got = [y, *torch.autograd.grad(y, [x, *case.params], g)]
    ref = _reference(case, x, g, w32, A, B, m)
    names = ["y", "dx", "dA", "dB", "dm"]
    return {names[i]: rel_err(a, b) for i, (a, b) in enumerate(zip(got, ref))}


def run_layer_row(rows: list[Row], cfg: Settings, name: str, build: Callable[[], LayerCase], tokens: int,
                  width: int, x: Tensor, g: Tensor, A: Tensor, B: Tensor, shared: dict[str, Any],
                  baseline: dict[tuple[int, int], float], section: str = "layers") -> None:
    """One row: build the layer, check it (status MISMATCH beyond TOL), then its peak memory and time; the
    frozen Linear's time goes to `baseline`, which every later row of the same size is a ratio to."""
    def body(row: Row) -> None:
        case = build()
        with _fast_flags(case.fast_flags):
            measure(row, case)

    def measure(row: Row, case: LayerCase) -> None:
        w32 = shared["w32_nf4"] if case.quantized else shared["w32"]
        m = (shared["m_nf4"] if case.quantized else shared["m_dense"]) if case.kind == "dora" else None
        errs = check_case(case, x, g, w32, A, B, m)
        row.err = max(errs.values())
        row.info["errors"] = errs
        if not row.err <= TOL:
            row.status = "MISMATCH"
            return
        inputs = [x, *case.params]

        def step() -> None:
            torch.autograd.grad(case.fn(x), inputs, g)

        row.peak_mib, row.extra_mib = peak(step, cfg.device)
        t = time_fn(step, warmup=cfg.warmup, reps=cfg.reps, device=cfg.device)
        row.ms = t.median_ms
        row.info.update(min_ms=t.min_ms, max_ms=t.max_ms, reps=t.reps, clock=t.clock)
        if name == "frozen bf16 nn.Linear":
            baseline[(tokens, width)] = t.median_ms
        if (tokens, width) in baseline:
            row.ratio = t.median_ms / baseline[(tokens, width)]
        if isinstance(case.module, LoRALinear) and not case.quantized:
            row.info["path"] = fast.choose_path(tokens, width, width, R)

    guard(rows, Row(section, name, f"N={tokens} {width}x{width}"), body, cfg.device)


# ---------------------------------------------------------------------------------------------------------
# Section layers


def _layer_plan(cfg: Settings) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """(width, token counts) of the full rows, and the token counts of the paths rows at width 4096."""
    if cfg.device.type != "cuda":
        return CPU_LAYER_PLAN, sorted({t for _, ts in CPU_LAYER_PLAN for t in ts})
    plan = [(4096, [16, 8192] if cfg.quick else [16, 1024, 8192])]
    if not cfg.quick:
        plan.append((8192, [1024, 8192]))
    return plan, [16, 1024, 8192] if cfg.quick else [16, 64, 256, 1024, 2048, 4096, 8192]


def layer_section(cfg: Settings) -> list[Row]:
    rows: list[Row] = []
    dev = cfg.device
    plan, sweep = _layer_plan(cfg)
    baseline: dict[tuple[int, int], float] = {}
    for width, token_list in plan:
        A, B = adapter_weights(width, dev)
        m_factor = 1 + 0.1 * torch.randn(width, device=dev)
        try:
            builders, shared = layer_cases(width, dev, A, B, m_factor, seed=2)
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
                run_layer_row(rows, cfg, name, build, tokens, width, x, g, A, B, shared, baseline)
            if tokens in sweep_here:
                for name, build in shared["path_builders"].items():
                    run_layer_row(rows, cfg, name, build, tokens, width, x, g, A, B, shared, baseline, "paths")
            del x, g
        del builders, shared
        free(dev)
    return rows


# ---------------------------------------------------------------------------------------------------------
# Section host


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
    A, B = adapter_weights(width, dev)
    builders, shared = layer_cases(width, dev, A, B, 1 + 0.1 * torch.randn(width, device=dev), seed=2)
    builders.update({f"minilora {k}": v for k, v in shared["path_builders"].items()})
    # the fused LoRA layer's host time taken apart: called as a module (as in a model), its fused function
    # alone (the rows above), and its operations with nothing around them
    builders["minilora fused LoRA, module call"] = shared["host_builders"]["module"]
    builders["same ops, bare autograd.Function"] = shared["host_builders"]["same_ops"]
    x = torch.randn(tokens, width, device=dev, dtype=DTYPE, requires_grad=True)
    g = torch.randn(tokens, width, device=dev, dtype=DTYPE)
    frozen: list[float] = []
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)  # a toy op gains nothing from threads, and their hand-offs are host time too
    try:
        for name, build in builders.items():
            _host_row(rows, cfg, name, build, x, g, rounds, steps, frozen)
    finally:
        torch.set_num_threads(threads)
    return rows


def _per_call_ms(step: Callable[[], None], rounds: int, steps: int, device: torch.device) -> list[float]:
    """Per-call time of `steps` back-to-back calls, one figure per round, one sync per round."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    per_call = []
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        per_call.append((time.perf_counter() - t0) / steps * 1e3)
    return per_call


def _host_row(rows: list[Row], cfg: Settings, name: str, build: Callable[[], LayerCase], x: Tensor, g: Tensor,
              rounds: int, steps: int, frozen: list[float]) -> None:
    """One host row: per-call time of `steps` back-to-back forward + backward calls, median over `rounds`."""
    def body(row: Row) -> None:
        case = build()
        inputs = [x, *case.params]

        def step() -> None:
            torch.autograd.grad(case.fn(x), inputs, g)

        with _fast_flags(case.fast_flags):
            for _ in range(max(cfg.warmup, 3) * 4):
                step()
            per_call = _per_call_ms(step, rounds, steps, cfg.device)
            row.info["ops"] = count_ops(step)
        q1, _, q3 = statistics.quantiles(per_call, n=4, method="inclusive")
        row.ms = statistics.median(per_call)
        row.info.update(q1_ms=q1, q3_ms=q3, iqr_ms=q3 - q1, min_ms=min(per_call), rounds=rounds, calls=steps,
                        us_per_op=row.ms * 1e3 / max(row.info["ops"], 1))
        if name == "frozen bf16 nn.Linear":
            frozen.append(row.ms)
        if frozen:
            row.ratio = row.ms / frozen[0]

    guard(rows, Row("host", name, f"N={HOST_SHAPE[0]} {HOST_SHAPE[1]}x{HOST_SHAPE[1]} r{R}"), body, cfg.device)


# ---------------------------------------------------------------------------------------------------------
# The merged/unmerged crossover, from the paths rows

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


def crossover_text(cross: dict[str, Any]) -> str:
    """The crossover lines printed last, ending with the `# SET fast.... = ...` lines (bench/NOTES.md)."""
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
