"""Sections buildsweep and paths: the runs that set fast.py's and the kernels' constants.

buildsweep: W' = W0 + s·B A for an NF4+DQ and a dense bf16 W0 at the four shapes of a Llama-3-8B layer's
projections: each Triton configuration of BUILD_GRID, the PyTorch build, a copy of the same bf16 bytes; GPU
time of the kernels alone (`time_queued`). Its summary lines set LORA_WEIGHT_CONFIG and TRITON_BUILD.
paths: fused LoRA / QLoRA forward + backward, merged vs unmerged, widths 4096 and 8192, N up to 16384; the
crossover lines (`bench.layers.crossover_text`) set MERGE_CROSSOVER and MERGE_CROSSOVER_FREE_BUILD.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from bench import layers
from bench.common import DTYPE, R, Row, Settings, free, guard, rel_err, timed_queued
from bench.nf4 import nf4_bytes
from minilora import kernels
from minilora.nf4 import dequantize_nf4

# (out, in) on a GPU: a Llama-3-8B layer's q and o, k and v, gate and up, down (the 2026-11-23 sweep's
# 8192² is gone: the 8B step is what the constants serve now)
BUILD_SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
BUILD_KINDS = ("nf4", "dense")  # NF4 first: the time budget may cut the second kind short
CPU_BUILD_SHAPES = [(64, 256)]
# "outer" left the grid after the 2026-11-23 sweep (2.5-140x the best "dot" time at every shape); a third form,
# rank-r multiply-adds into the tile itself, took 1.6-2.0x the best "dot" time at all four shapes in call T
# (2026-12-07) and was dropped
BUILD_GRID = {"variant": ("dot",), "bm": (16, 32, 64), "bn": (128, 256, 512), "num_warps": (4, 8)}
BUILD_BUFFERS, BUILD_REPS = 3, (30, 10)  # distinct weights per row (3 x 34+ MB > the 50 MB L2); timed calls
SWEEP_BUDGET_S = 150.0  # buildsweep stops adding Triton configurations after this many seconds (GPU)
PATHS_PLAN = {4096: [256, 1024, 2048, 4096, 8192, 16384], 8192: [1024, 4096, 8192, 16384]}
PATHS_REPS = 20  # timed calls per paths row on a GPU (the rows at 8192² x 16384 tokens take ~8 ms each)


# ---------------------------------------------------------------------------------------------------------
# Section buildsweep


def _build_grid(cfg: Settings) -> list[dict[str, Any]]:
    """Triton build configurations to try: the full grid on a GPU, one per variant on a CPU / with --quick."""
    if cfg.device.type != "cuda" or cfg.quick:
        return [{"variant": v, "bm": 16, "bn": 128, "num_warps": 4} for v in BUILD_GRID["variant"]]
    return [{"variant": v, "bm": bm, "bn": bn, "num_warps": nw} for v in BUILD_GRID["variant"]
            for bm in BUILD_GRID["bm"] for bn in BUILD_GRID["bn"] for nw in BUILD_GRID["num_warps"]]


def config_tag(c: dict[str, Any]) -> str:
    """A build configuration as the rows name it: 'dot bm32 bn256 w4'."""
    return f"{c['variant']} bm{c['bm']} bn{c['bn']} w{c['num_warps']}"


@dataclass
class BuildShape:
    """One shape of the sweep: BUILD_BUFFERS distinct W0s, the adapter (A, B), and the copy's time that
    each build row is set against."""

    cfg: Settings
    w0s: list[Tensor]
    A: Tensor
    B: Tensor
    reps: int
    copy_tbps: float | None
    copy_ms: float | None = None

    @property
    def tag(self) -> str:
        return f"{self.w0s[0].shape[0]}x{self.w0s[0].shape[1]} r{R}"

    def copy_row(self, row: Row) -> None:
        dst = torch.empty_like(self.w0s[0])
        timed_queued(row, [lambda w=w: dst.copy_(w) for w in self.w0s], self.cfg, self.reps)
        n = self.w0s[0].numel()
        row.info["bytes"] = 4 * n
        row.info["TBps"] = 4 * n / (row.ms * 1e-3) / 1e12

    def measure(self, row: Row, fn: Callable[[Any], Tensor], bases: list[Any], ref: Tensor, n_bytes: int) -> None:
        """Check fn(bases[0]) against `ref` (relative error ≤ 3e-3), then time fn over all bases."""
        row.err = rel_err(fn(bases[0]), ref)
        if not row.err <= 3e-3:
            row.status = "MISMATCH"
            return
        timed_queued(row, [lambda b=b: fn(b) for b in bases], self.cfg, self.reps)
        row.info["bytes"] = n_bytes
        row.info["TBps"] = n_bytes / (row.ms * 1e-3) / 1e12
        if self.copy_tbps:
            row.info["fraction_of_copy"] = row.info["TBps"] / self.copy_tbps
        if self.copy_ms:
            row.info["copy_ms"] = self.copy_ms


def _build_kind(s: BuildShape, kind: str, low_rank: Tensor) -> tuple[list[Any], Tensor, int, Callable, Callable]:
    """(bases, float32 W', bytes moved, PyTorch build, Triton build) of one base kind, "dense" or "nf4"."""
    n = s.w0s[0].numel()
    A, B = s.A, s.B
    if kind == "dense":
        return (s.w0s, s.w0s[0].float() + low_rank, 4 * n, lambda w: torch.addmm(w, B, A, alpha=2.0),
                kernels.dense_lora_weight_triton)
    bases = [kernels.quantize(w, 64, True) for w in s.w0s]
    return (bases, dequantize_nf4(bases[0], torch.float32) + low_rank, nf4_bytes(n, True),
            lambda q: kernels.dequantize(q, DTYPE).addmm_(B, A, alpha=2.0),
            lambda q, a, b, scale, **kw: kernels.nf4_lora_weight_triton(q, a, b, scale, DTYPE, **kw))


def _build_rows(rows: list[Row], s: BuildShape, kind: str, low_rank: Tensor, grid: list[dict[str, Any]],
                started: float) -> None:
    """The torch build, then each Triton configuration of `grid` (until SWEEP_BUDGET_S on a GPU)."""
    dev = s.cfg.device
    label = "dense" if kind == "dense" else "NF4+DQ"
    bases, ref, n_bytes, torch_fn, triton_fn = _build_kind(s, kind, low_rank)
    guard(rows, Row("buildsweep", f"{label} torch build", s.tag),
          lambda row: s.measure(row, torch_fn, bases, ref, n_bytes), dev)
    torch_ms = rows[-1].ms
    for c in grid:
        row = Row("buildsweep", f"{label} Triton {config_tag(c)}", s.tag, info={"config": dict(c)})
        if dev.type == "cuda" and time.time() - started > SWEEP_BUDGET_S:
            row.status = "skipped (time budget)"
            rows.append(row)
            continue

        def body(row: Row, c: dict[str, Any] = c) -> None:
            s.measure(row, lambda w: triton_fn(w, s.A, s.B, 2.0, **c), bases, ref, n_bytes)
            if row.ms and torch_ms:
                row.ratio = row.ms / torch_ms

        guard(rows, row, body, dev)


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
    grid = _build_grid(cfg) if kernels.triton_usable(dev) else []
    started = time.time()
    for out_f, in_f in shapes:
        torch.manual_seed(6)
        w0s = [torch.randn(out_f, in_f, device=dev, dtype=DTYPE) * 0.02 for _ in range(n_buf)]
        A = torch.randn(R, in_f, device=dev, dtype=DTYPE) / math.sqrt(in_f)
        B = torch.randn(out_f, R, device=dev, dtype=DTYPE) * 0.1
        low_rank = 2.0 * B.float() @ A.float()
        s = BuildShape(cfg, w0s, A, B, reps, copy_tbps)
        guard(rows, Row("buildsweep", "copy bf16 W0", s.tag), s.copy_row, dev)
        s.copy_ms = rows[-1].ms
        for kind in BUILD_KINDS:
            _build_rows(rows, s, kind, low_rank, grid, started)
        del s, w0s, A, B, low_rank
        free(dev)
    return rows


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
                per_shape.setdefault(r.config, {})[config_tag(r.info["config"])] = r
        for shape, by_cfg in per_shape.items():
            best = min(by_cfg.values(), key=lambda r: r.ms)
            out["shapes"].append({"kind": kind, "shape": shape, "best": config_tag(best.info["config"]),
                                  "best_ms": best.ms, "TBps": best.info.get("TBps"),
                                  "fraction_of_copy": best.info.get("fraction_of_copy"),
                                  "torch_ms": torch_ms.get(shape), "copy_ms": copy.get(shape)})
        choice = _choose_config(per_shape, torch_ms)
        if choice is not None:
            out["kinds"][kind] = choice
    return out


def _choose_config(per_shape: dict[str, dict[str, Row]], torch_ms: dict[str, float]) -> dict[str, Any] | None:
    """The configuration measured at every shape with the smallest geometric mean of time / that shape's
    best, and whether the best Triton times beat the torch build (geometric mean of the ratios < 1)."""
    common = set.intersection(*(set(v) for v in per_shape.values())) if per_shape else set()
    if not common:
        return None
    best_ms = {s: min(r.ms for r in v.values()) for s, v in per_shape.items()}
    score = {t: math.exp(statistics.fmean(math.log(per_shape[s][t].ms / best_ms[s]) for s in per_shape))
             for t in common}
    chosen = min(score, key=score.get)
    config = next(iter(per_shape.values()))[chosen].info["config"]
    vs_torch = [best_ms[s] / torch_ms[s] for s in per_shape if s in torch_ms]
    geo = math.exp(statistics.fmean(math.log(v) for v in vs_torch)) if vs_torch else None
    return {"config": config, "slowdown_vs_best": score[chosen], "triton_over_torch": geo,
            "use_triton": geo is not None and geo < 1.0}


def build_summary_text(summary: dict[str, Any]) -> str:
    """The buildsweep lines printed last, ending with the `# SET ...` lines (bench/NOTES.md)."""
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
# Section paths


def paths_section(cfg: Settings) -> list[Row]:
    """Forward + backward of the fused LoRA and QLoRA layers on both paths (QLoRA merged with the Triton
    build and with the torch build) over PATHS_PLAN, next to the frozen bf16 Linear of the same N."""
    rows: list[Row] = []
    dev = cfg.device
    cfg = Settings(dev, cfg.quick, cfg.warmup, min(cfg.reps, PATHS_REPS))
    plan = PATHS_PLAN if dev.type == "cuda" else {w: ts for w, ts in layers.CPU_LAYER_PLAN}
    if dev.type == "cuda" and cfg.quick:
        plan = {4096: [1024, 8192]}
    for width, token_list in plan.items():
        A, B = layers.adapter_weights(width, dev)
        try:
            builders, shared = layers.layer_cases(width, dev, A, B, 1 + 0.1 * torch.randn(width, device=dev), seed=2)
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
                layers.run_layer_row(rows, cfg, name, build, tokens, width, x, g, A, B, shared, baseline, "paths")
            del x, g
        del builders, shared, chosen
        free(dev)
    return rows
