"""What every section of the benchmark shares: the row record, the run's settings, the checks around a row,
and the output (JSON, plot, the printed tables, the target table)."""

from __future__ import annotations

import gc
import importlib.metadata as md
import json
import math
import os
import tempfile
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from minilora.profiling import time_queued, time_rotating

R, ALPHA = 16, 32  # rank and alpha of every adapter here (s = 2)
TOL = 3e-2  # bf16 agreement with the float32 evaluation; bf16 rounding alone gives about 4e-3
DTYPE = torch.bfloat16


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
# Around each row: free memory, compare, measure the peak, record failures, time


def enable_checkpointing(model: torch.nn.Module, reentrant: bool = False) -> None:
    """transformers' gradient checkpointing (non-reentrant unless asked), by the method's new name where this
    transformers has it (activation_checkpointing_enable, 5.25 on), else the old one; both take the options
    first."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": reentrant})


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def rel_err(got: Tensor, ref: Tensor) -> float:
    """‖got − ref‖ / ‖ref‖ in float64; inf when `got` holds a non-finite value."""
    got, ref = got.detach().double(), ref.detach().double()
    if not torch.isfinite(got).all():
        return math.inf
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def peak(fn: Callable[[], object], device: torch.device) -> tuple[float | None, float | None]:
    """(peak MiB during fn, peak minus what was allocated before), or Nones on a CPU."""
    if device.type != "cuda":
        fn()
        return None, None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    top = torch.cuda.max_memory_allocated(device)
    return top / 2**20, (top - before) / 2**20


def guard(rows: list[Row], row: Row, body: Callable[[Row], None], device: torch.device) -> None:
    """Run one row; any exception is recorded in the row (and the run goes on)."""
    try:
        body(row)
    except Exception as err:  # noqa: BLE001 - a benchmark row must never take the others down
        row.status = "error"
        row.info["error"] = f"{type(err).__name__}: {err}"[:500]
        row.info["trace"] = traceback.format_exc()[-2000:]
    finally:
        rows.append(row)
        free(device)
    print(f"{row.section:7} " + compact(row), flush=True)


def timed(row: Row, fns: list[Callable[[], object]], cfg: Settings, reps: int) -> None:
    """Time into a row: ms = median; the spread (quartiles, IQR, min, max, reps, buffers) into row.info."""
    spread = time_rotating(fns, warmup=cfg.warmup, reps=reps, device=cfg.device)
    row.ms = spread["median_ms"]
    row.info.update(spread)


def timed_queued(row: Row, fns: list[Callable[[], object]], cfg: Settings, reps: int) -> None:
    """As `timed`, with the GPU time of the kernels alone (`time_queued`)."""
    spread = time_queued(fns, warmup=cfg.warmup, reps=reps, device=cfg.device)
    row.ms = spread["median_ms"]
    row.info.update(spread)


# ---------------------------------------------------------------------------------------------------------
# Output


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in ("torch", "triton", "peft", "bitsandbytes", "transformers", "minilora"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["torch.version.cuda"] = torch.version.cuda
    return out


def write_json(path: str, data: dict) -> None:
    """Write `data` to `path` atomically (a temporary file, then a rename), creating the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def plot(rows: list[Row], path: str) -> None:
    """Two panels: layer rows as ratios to the frozen Linear, nf4 rows in ms."""
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


def compact(row: Row) -> str:
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


def summary_table(rows: list[Row]) -> str:
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
        lines.append(compact(r))
    best: dict[tuple[str, str, str], Row] = {}
    for r in rows:
        if r.section in ("tuning", "build") and r.ms is not None:
            key = (r.section, r.name.split(" bm")[0], r.config.split(" b")[0])
            if key not in best or r.ms < best[key].ms:
                best[key] = r
    if best:
        lines.append("-- fastest kernel configuration of each sweep")
        lines += [compact(r) for r in best.values()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Targets

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


def _target_row(rows: list[Row], section: str, name: str, config: str) -> Row | None:
    """The row a target reads: layers, the largest token count of that width; others, the only match."""
    found = [r for r in rows if r.section == section and r.name == name and r.ms is not None
             and r.status == "ok" and (r.config.endswith(config) if section == "layers"
                                       else r.config == config if section == "nf4" else config in r.config)]
    return max(found, key=lambda r: int(r.config.split()[0][2:]) if section == "layers" else 0, default=None)


def targets(rows: list[Row]) -> list[dict[str, Any]]:
    """The target table: per figure the peer's and our value (largest token count for layer rows), met or not."""
    table = []
    for figure, section, peer_name, our_name, config, kind, target in TARGETS:
        peer, ours = _target_row(rows, section, peer_name, config), _target_row(rows, section, our_name, config)
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


def targets_table(table: list[dict[str, Any]]) -> str:
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["# targets (layers: ratio to the frozen bf16 Linear of the same run; nf4: ms, speedup = peer/ours)",
             f"{'figure':40} {'peer':>9} {'ours':>9} {'speedup':>8} {'target':>7}  met?"]
    for e in table:
        lines.append(f"{e['figure']:40} {f(e['peer']):>9} {f(e['ours']):>9} {f(e.get('speedup')):>8} "
                     f"{f(e['target']):>7}  {'-' if e['met'] is None else 'yes' if e['met'] else 'NO'}")
    return "\n".join(lines)
