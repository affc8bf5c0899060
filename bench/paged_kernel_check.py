"""PagedAdamW's update of one chunk on a GPU: the one-kernel Triton update against chapter 7's PyTorch update.

For chunks of 8B-layer sizes (an MLP matrix of Llama-3-8B, 4096 x 14336 = 58.7M elements; the 23,342,080-element
chunk that `bench/paged_gpu.py`'s 1 GiB budget and 6 slots give 8-bit state; a 4096 x 4096 attention matrix), bf16
parameters and gradients, 8-bit and fp32 state:

* agreement: from one state reached by three PyTorch steps, one more step each way; the largest parameter
  difference (absolute, and in units of 4ε(|θ| + |Δθ|), what the GPU test allows), how many codes
  differ, the largest relative absmax difference (fp32 state: the largest m and v differences);
* time: CUDA events around each update, median (min, max) of `--reps` repeats after two warm-up calls, for
  the kernel and for the PyTorch update, and for a few kernel configurations (blocks of 256 per program,
  warps); with the bytes each update must move, its effective bandwidth.

    python bench/paged_kernel_check.py --out bench/results/paged_kernel_check.json   # on a GPU, ~1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing minilora
from minilora import fast, paged  # noqa: E402
from minilora.double_quant import dynamic_map, map_tables  # noqa: E402
from minilora.profiling import environment  # noqa: E402

SIZES = {"4096x14336": 4096 * 14336, "23342080 (the 8-bit chunk of a 1 GiB budget in 6 slots)": 23_342_080, "4096x4096": 4096 * 4096}
CONFIGS = [{"blocks_per_program": b, "num_warps": w} for b, w in ((1, 2), (2, 2), (4, 4), (8, 4), (8, 8), (16, 8))]
HYPER = dict(lr=1e-5, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


def time_ms(fn: Callable[[], None], reps: int) -> dict[str, float]:
    """Median, min and max over `reps` calls, each timed with CUDA events, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "reps": reps}


def new_state(n: int, eight: bool, device: torch.device) -> dict[str, torch.Tensor]:
    if eight:
        blocks = -(-n // paged.STATE_BLOCK)
        return {"exp_avg": torch.zeros(n, dtype=torch.uint8, device=device),
                "exp_avg_sq": torch.zeros(n, dtype=torch.uint8, device=device),
                "exp_avg_absmax": torch.zeros(blocks, device=device),
                "exp_avg_sq_absmax": torch.zeros(blocks, device=device)}
    return {"exp_avg": torch.zeros(n, device=device), "exp_avg_sq": torch.zeros(n, device=device)}


def pytorch_update(*args) -> None:
    """Chapter 7's update, with the fused one switched off for the call."""
    saved = paged._FUSED_UPDATE
    paged.set_fused_update(None)
    try:
        paged._update_staged(*args)
    finally:
        paged.set_fused_update(saved)


def agreement(n: int, eight: bool, tables: tuple, device: torch.device, dtype: torch.dtype) -> dict[str, float | int]:
    """One step each way from a common state; lr 1e-3, so that most bf16 parameters move at all."""
    hyper = {**HYPER, "lr": 1e-3}
    torch.manual_seed(0)
    w = torch.randn(n, device=device).to(dtype)
    state = new_state(n, eight, device)
    for step in (1, 2, 3):
        pytorch_update(w, (torch.randn(n, device=device) * 1e-2).to(dtype), state, float(step), hyper, tables)
    g = (torch.randn(n, device=device) * 1e-2).to(dtype)
    fused_w, ref_w = w.clone(), w.clone()
    fused_s = {k: v.clone() for k, v in state.items()}
    ref_s = {k: v.clone() for k, v in state.items()}
    fast.adamw_update_triton(fused_w, g, fused_s, 4.0, hyper, tables)
    pytorch_update(ref_w, g, ref_s, 4.0, hyper, tables)
    torch.cuda.synchronize()
    diff = (fused_w.double() - ref_w.double()).abs()
    allowed = 4 * torch.finfo(dtype).eps * (w.double().abs() + (ref_w.double() - w.double()).abs())
    out: dict[str, float | int] = {
        "param_max_abs_diff": diff.max().item(),
        "param_differing": int((fused_w != ref_w).sum()),
        "param_max_diff_over_allowed": (diff / allowed.clamp_min(1e-300)).max().item(),
        "param_changed_by_step": int((ref_w != w).sum()),
    }
    if eight:
        for k in ("exp_avg", "exp_avg_sq"):
            out[f"{k}_codes_differing"] = int((fused_s[k] != ref_s[k]).sum())
            a, b = fused_s[k + "_absmax"], ref_s[k + "_absmax"]
            out[f"{k}_absmax_max_rel_diff"] = ((a - b).abs() / b.abs().clamp_min(1e-30)).max().item()
    else:
        for k in ("exp_avg", "exp_avg_sq"):
            a, b = fused_s[k], ref_s[k]
            out[f"{k}_max_rel_diff"] = ((a - b).abs() / b.abs().clamp_min(1e-30)).max().item()
    return out


def timings(n: int, eight: bool, tables: tuple, device: torch.device, reps: int) -> dict:
    w = torch.randn(n, device=device).to(torch.bfloat16)
    g = (torch.randn(n, device=device) * 1e-2).to(torch.bfloat16)
    state = new_state(n, eight, device)
    pytorch_update(w, g, state, 1.0, HYPER, tables)
    state_bytes = 2 + 8 / paged.STATE_BLOCK if eight else 8  # m and v per element, absmax included
    moved = n * (2 * 2 + 2 + 2 * state_bytes)  # bf16 param read + written, bf16 grad read, state read + written
    out = {"bytes_moved_by_kernel": moved,
           "pytorch": time_ms(lambda: pytorch_update(w, g, state, 2.0, HYPER, tables), reps)}
    for cfg in CONFIGS:
        t = time_ms(lambda: fast.adamw_update_triton(w, g, state, 2.0, HYPER, tables, config=cfg), reps)
        t["gbps"] = moved / (t["median"] * 1e-3) / 1e9
        out[f"triton {cfg['blocks_per_program']}x256, {cfg['num_warps']} warps"] = t
    best = min((k for k in out if k.startswith("triton")), key=lambda k: out[k]["median"])
    default = f"triton {fast.ADAMW_CONFIG['blocks_per_program']}x256, {fast.ADAMW_CONFIG['num_warps']} warps"
    out["fastest_config"] = best
    out["speedup_default_config"] = out["pytorch"]["median"] / out[default]["median"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write (also printed)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated keys of SIZES")
    args = parser.parse_args()
    if not torch.cuda.is_available() or not fast.kernels.HAVE_TRITON:
        sys.exit("needs a CUDA GPU and triton (tests/test_paged_kernel.py checks the kernel on a CPU)")
    device = torch.device("cuda")
    tables = (map_tables(dynamic_map(True), device), map_tables(dynamic_map(False), device))
    results: dict = {"environment": environment(device).as_dict(), "hyper": HYPER,
                     "timed": "bf16 parameters and gradients (agreement: bf16 and fp32, lr 1e-3)",
                     "default_config": fast.ADAMW_CONFIG, "runs": []}
    for name in args.sizes.split(","):
        n = SIZES[name]
        for eight in (True, False):
            row = {"size": name, "elements": n, "state": "8-bit" if eight else "fp32",
                   "agreement": {str(dt).removeprefix("torch."): agreement(n, eight, tables, device, dt)
                                 for dt in (torch.bfloat16, torch.float32)},
                   "time_ms": timings(n, eight, tables, device, args.reps)}
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=args.out.parent, prefix=args.out.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
