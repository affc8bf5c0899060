"""Paged AdamW on a GPU: full fine-tuning of Llama shapes, each optimizer in its own process.

Models are Llama-architecture (`minilora.memory.build_llama`) with RANDOM weights: memory and time do not
depend on the weights' values, and nothing is downloaded. Every configuration runs in a fresh Python process,
so its peak host memory (VmHWM) and GPU memory are its own. Each trains bf16 weights with activation
checkpointing on a batch of `--batch` x `--seq` tokens: warm-up steps, then `--reps` timed steps (CUDA events,
every stream synchronized at the end of each step, so the write-backs of the paged state are inside the
time). Out-of-memory is a result, recorded as "oom".

0. `link`: pinned host<->GPU copy bandwidth, one way and both ways at once (the floor of paging), and the
   equality of PagedAdamW (fp32, step in backward) with torch.optim.AdamW on a small fp32 model.
1. 8B shape (Llama-3-8B): torch AdamW with fp32 moments (expected not to fit), torch AdamW (bf16 moments),
   no optimizer at all (forward + backward only: the compute floor), minilora PagedAdamW (8-bit and fp32
   state, step in backward), bitsandbytes PagedAdamW8bit and AdamW8bit (the non-paged control).
2. 1B shape (TinyLlama-1.1B): torch AdamW against PagedAdamW (8-bit and fp32, step in backward).

    python bench/paged_gpu.py --out bench/results/paged_gpu.json            # on a GPU, about 5 minutes
    python bench/paged_gpu.py --out /tmp/paged_cpu.json --device cpu --tiny  # smoke test without a GPU
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing minilora
from bench.common import enable_checkpointing  # noqa: E402
from minilora.memory import LLAMA_SHAPES, LlamaShape, build_llama  # noqa: E402
from minilora.paged import PagedAdamW  # noqa: E402
from minilora.profiling import environment  # noqa: E402

GIB = 2**30
SHAPES: dict[str, LlamaShape] = {
    "tiny": LlamaShape(hidden=64, intermediate=172, layers=2, heads=4, kv_heads=2, vocab=512),
    "small": LlamaShape(hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4, vocab=2048),
    "1B": LLAMA_SHAPES["TinyLlama-1.1B"],
    "8B": LLAMA_SHAPES["Llama-3-8B"],
}
CONFIG_OVERRIDES: dict[str, dict[str, Any]] = {"8B": dict(rope_theta=500000.0)}  # Llama-3's RoPE base
LR = 1e-5

# (name, shape, optimizer): the order they run in, most important first (a run that hits --time-budget
# skips what is left, and the results file says so).
CONFIGS: list[tuple[str, str, str]] = [
    ("8B torch AdamW fp32 moments", "8B", "torch_fp32_moments"),
    ("8B minilora PagedAdamW 8-bit, step in backward", "8B", "paged8"),
    ("8B bitsandbytes PagedAdamW8bit", "8B", "bnb_paged8"),
    ("8B bitsandbytes AdamW8bit (not paged)", "8B", "bnb8"),
    ("8B torch AdamW", "8B", "torch"),
    ("8B no optimizer (forward + backward)", "8B", "none"),
    ("1B torch AdamW", "1B", "torch"),
    ("1B minilora PagedAdamW 8-bit, step in backward", "1B", "paged8"),
    ("1B minilora PagedAdamW fp32, step in backward", "1B", "paged32"),
    ("8B minilora PagedAdamW fp32, step in backward", "8B", "paged32"),
]


# ---------------------------------------------------------------------------------------------------------
# Helpers


def save_json(path: Path, data: dict) -> None:
    """Write atomically: a temp file in the same folder, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def host_memory() -> dict[str, float | None]:
    """This process's resident and peak resident host memory (its own: one process per run), in GiB."""
    out: dict[str, float | None] = {"rss_gib": None, "peak_rss_gib": None, "total_gib": None}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_gib"] = int(line.split()[1]) * 1024 / GIB
            elif line.startswith("VmHWM:"):
                out["peak_rss_gib"] = int(line.split()[1]) * 1024 / GIB
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                out["total_gib"] = int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return out


def device_used_gib(device: torch.device) -> float | None:
    """GPU memory in use as the driver sees it: torch's cache, CUDA managed pages, the context."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / GIB


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# ---------------------------------------------------------------------------------------------------------
# 0. The link: pinned copy bandwidth, and equality with torch AdamW


def link_bandwidth(device: torch.device, n_bytes: int = 1 << 30, reps: int = 5) -> dict:
    """GB/s of pinned host->GPU, GPU->host, and both at once on two streams (medians of `reps`)."""
    host_a = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=True)
    host_b = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=True)
    dev_a = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dev_b = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    s_in, s_out = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def timed(fn: Callable[[], None]) -> float:
        times = []
        for _ in range(reps + 1):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    def both() -> None:
        with torch.cuda.stream(s_in):
            dev_a.copy_(host_a, non_blocking=True)
        with torch.cuda.stream(s_out):
            host_b.copy_(dev_b, non_blocking=True)

    t_in = timed(lambda: dev_a.copy_(host_a, non_blocking=True))
    t_out = timed(lambda: host_b.copy_(dev_b, non_blocking=True))
    t_both = timed(both)
    return {"bytes": n_bytes, "to_gpu_gbps": n_bytes / t_in / 1e9, "to_host_gbps": n_bytes / t_out / 1e9,
            "both_ways_each_gbps": n_bytes / t_both / 1e9, "clock": "perf_counter around synchronize"}


def equality_check(device: torch.device, shape: str, steps: int = 4, seq: int = 64) -> dict:
    """torch AdamW (single-tensor) and PagedAdamW (fp32 state, step in backward, small chunks) on twin fp32
    models, the same batches: the largest weight difference, against torch's own foreach-vs-single noise."""
    models = [build_llama(SHAPES[shape], torch.float32, device, seed=0, attn_implementation="eager")
              for _ in range(3)]
    hyper = dict(lr=1e-3, weight_decay=0.01)
    opts = [torch.optim.AdamW(models[0].parameters(), foreach=False, **hyper),
            torch.optim.AdamW(models[1].parameters(), foreach=True, **hyper),
            PagedAdamW(models[2].parameters(), step_in_backward=True, gpu_budget_bytes=4 << 20, **hyper)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(steps):
            g = torch.Generator().manual_seed(100 + step)
            ids = torch.randint(0, SHAPES[shape].vocab, (2, seq), generator=g).to(device)
            for model, opt in zip(models, opts):
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device) if device.type == "cuda" else None

    def diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
        return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()) if x.numel())

    out = {"shape": shape, "steps": steps, "chunks_per_step": opts[2].last_step["chunks"],
           "max_abs_diff_paged_vs_torch_single_tensor": diff(models[2], models[0]),
           "max_abs_diff_torch_foreach_vs_single_tensor": diff(models[1], models[0])}
    if device.type == "cuda":  # 8-bit state: streamed in backward on the GPU against in place on the CPU
        cpu_model = build_llama(SHAPES[shape], torch.float32, "cpu", seed=0, attn_implementation="eager")
        pair = [copy.deepcopy(cpu_model).to(device), cpu_model]  # the same initial weights on both
        eight = [PagedAdamW(m.parameters(), state_bits=8, step_in_backward=True, gpu_budget_bytes=4 << 20,
                            **hyper) for m in pair]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for step in range(steps):
                g = torch.Generator().manual_seed(100 + step)
                ids = torch.randint(0, SHAPES[shape].vocab, (2, seq), generator=g)
                for m in pair:
                    m(input_ids=ids.to(m.device), labels=ids.to(m.device)).loss.backward()
        torch.cuda.synchronize(device)
        out["max_abs_diff_paged8_gpu_vs_cpu"] = max(
            (x.cpu() - y).abs().max().item() for x, y in zip(pair[0].parameters(), pair[1].parameters()))
        out["max_abs_param_change_paged8"] = max(
            (x - y).abs().max().item() for x, y in zip(pair[1].parameters(), build_llama(
                SHAPES[shape], torch.float32, "cpu", seed=0).parameters()))
    return out


# ---------------------------------------------------------------------------------------------------------
# 1-2. One configuration, in its own process


def make_optimizer(kind: str, params: list[torch.nn.Parameter], args: argparse.Namespace) -> Any:
    """The optimizer of a configuration; None for forward + backward only (gradients freed as they come)."""
    budget = args.budget_mib * 2**20
    if kind == "none":
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        return None
    if kind in ("torch", "torch_fp32_moments"):
        opt = torch.optim.AdamW(params, lr=LR)
        if kind == "torch_fp32_moments":  # what AdamW keeps for mixed precision: moments in fp32, allocated now
            for p in params:
                opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p, dtype=torch.float32),
                                "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32)}
        return opt
    if kind in ("paged8", "paged32"):
        return PagedAdamW(params, lr=LR, state_bits=8 if kind == "paged8" else 32, step_in_backward=True,
                          gpu_budget_bytes=budget, slots=args.slots)
    import bitsandbytes as bnb

    return (bnb.optim.PagedAdamW8bit if kind == "bnb_paged8" else bnb.optim.AdamW8bit)(params, lr=LR)


def _state_bytes(opt: Any) -> dict[str, int]:
    """Optimizer state tensors by where they live (bitsandbytes' paged buffers are CUDA managed memory)."""
    out: dict[str, int] = {}
    for state in getattr(opt, "state", {}).values():
        for v in state.values():
            if torch.is_tensor(v):
                kind = "managed" if getattr(v, "is_paged", False) else v.device.type
                out[kind] = out.get(kind, 0) + v.nbytes
    return out


def profile_step(step: Callable[[], None], device: torch.device) -> dict[str, float]:
    """One step under torch.profiler: GPU time in kernels and in host<->GPU copies, against the step's length.
    Kernels and copies that overlap add up to more than the step: the excess is time hidden."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize(device)
    wall_ms = (time.perf_counter() - t0) * 1e3
    sums = {"kernels_ms": 0.0, "copies_to_gpu_ms": 0.0, "copies_to_host_ms": 0.0}
    for evt in prof.key_averages():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue  # the device-side events only: an operator's entry repeats the time of its kernels
        us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0) or 0
        if not us:
            continue
        if "Memcpy HtoD" in evt.key:
            sums["copies_to_gpu_ms"] += us / 1e3
        elif "Memcpy DtoH" in evt.key:
            sums["copies_to_host_ms"] += us / 1e3
        elif "Memcpy" not in evt.key and "Memset" not in evt.key:
            sums["kernels_ms"] += us / 1e3
    return {**sums, "step_wall_ms": wall_ms, "note": "one step under the profiler (slower than unprofiled)"}


def run_config(name: str, shape: str, kind: str, args: argparse.Namespace) -> dict:
    """Build the model, train warm-up + reps steps, record memory and time; OOM is a result, not a crash."""
    device = torch.device(args.device)
    result: dict[str, Any] = {"config": name, "shape": shape, "optimizer": kind, "batch": args.batch,
                              "seq": args.seq, "gradient_checkpointing": True, "lr": LR}
    baseline = device_used_gib(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result["weights"] = f"{str(dtype).replace('torch.', '')}, random"
    on_gpu = device.type == "cuda"
    t_start = time.perf_counter()
    try:
        model = build_llama(SHAPES[shape], dtype, device, seed=0, use_cache=False, max_position_embeddings=4096,
                            **CONFIG_OVERRIDES.get(shape, {}))
        enable_checkpointing(model)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        result.update(params=sum(p.numel() for p in params), weights_gib=sum(p.nbytes for p in params) / GIB)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, SHAPES[shape].vocab, (args.batch, args.seq), generator=g).to(device)
        opt = make_optimizer(kind, params, args)

        def step() -> None:
            model(input_ids=ids, labels=ids).loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)

        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for i in range(args.warmup + args.reps):
            t0 = time.perf_counter()
            if on_gpu:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                step()
                torch.cuda.synchronize(device)  # every stream: the paged write-backs belong to the step
                e1.record()
                e1.synchronize()
                ms = e0.elapsed_time(e1)
            else:
                step()
                ms = (time.perf_counter() - t0) * 1e3
            if i == 0:
                result["first_step_s"] = time.perf_counter() - t0
            if i >= args.warmup:
                times.append(ms)
        med = statistics.median(times)
        result.update(status="ok", reps=args.reps, warmup=args.warmup, step_ms=spread(times), step_ms_all=times,
                      tokens_per_s=args.batch * args.seq / (med / 1e3),
                      tokens_per_s_range=[args.batch * args.seq / (max(times) / 1e3),
                                          args.batch * args.seq / (min(times) / 1e3)],
                      clock="cuda-events" if on_gpu else "perf_counter", optimizer_state_bytes=_state_bytes(opt))
        if on_gpu:
            result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
            used = device_used_gib(device)
            result["device_used_gib"] = used
            result["device_used_gib_over_baseline"] = None if baseline is None else used - baseline
        if isinstance(opt, PagedAdamW):
            report = opt.memory_report()
            result["paged_report"] = report.as_dict()
            moved = report.last_step_bytes_to_gpu + report.last_step_bytes_to_host
            result["bytes_moved_per_step"] = moved
            result["state_bits"] = opt.state_bits
            result["slots"], result["chunk_elements"] = opt.slots, opt.chunk_elements
        if on_gpu and kind in args.profile:
            result["profile"] = profile_step(step, device)
    except torch.cuda.OutOfMemoryError as err:
        result.update(status="oom", error=str(err).strip().splitlines()[0][:300])
        if on_gpu:
            result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    except Exception as err:  # noqa: BLE001 - a failed run is recorded and the others still run
        result.update(status="error", error=f"{type(err).__name__}: {str(err).strip()[:500]}")
    result["host_memory"] = host_memory()
    result["wall_s"] = time.perf_counter() - t_start
    return result


# ---------------------------------------------------------------------------------------------------------
# The parent: one child process per configuration


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke test; use with --device cpu)")
    parser.add_argument("--big", action="store_true", help="accepted for old command lines: the 8B shape always runs")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024; 32 with --tiny)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--budget-mib", type=int, default=1024, help="PagedAdamW gpu_budget_bytes, in MiB")
    parser.add_argument("--slots", type=int, default=6, help="PagedAdamW slots (prefetch depth + 2)")
    parser.add_argument("--only", default="", help="comma-separated substrings of config names to run")
    parser.add_argument("--profile", default="paged8,paged32,none", help="optimizer kinds to profile")
    parser.add_argument("--time-budget", type=float, default=1800.0, help="seconds; later configs are skipped")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device (use --device cpu --tiny for a smoke test)")
    if args.seq is None:
        args.seq = 32 if args.tiny else 1024
    for name in ("batch", "seq", "reps", "budget_mib", "warmup"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    args.profile = [k for k in args.profile.split(",") if k]
    return args


def child_main(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if args.child == "link":
        out: dict[str, Any] = {"environment": environment(device).as_dict()}
        if device.type == "cuda":
            out["bandwidth"] = link_bandwidth(device)
        out["equality"] = equality_check(device, "tiny" if args.tiny else "small")
    else:
        name, shape, kind = next(c for c in configs(args) if c[0] == args.child)
        out = run_config(name, shape, kind, args)
    save_json(args.child_out, out)


def configs(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    chosen = [c for c in CONFIGS if not args.only or any(s in c[0] for s in args.only.split(","))]
    if args.tiny:  # the same optimizers on the tiny shape (no bitsandbytes on a CPU)
        chosen = [(n.replace(s, "tiny", 1), "tiny", k) for n, s, k in chosen if not k.startswith("bnb")]
        chosen = list({n: (n, s, k) for n, s, k in chosen}.values())
    return chosen


def run_child(name: str, args: argparse.Namespace, argv: list[str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", name, "--child-out", str(out)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            return {"config": name, "shape": name.split()[0], "status": "timeout", "error": f"over {timeout:.0f} s"}
        if out.exists():
            return json.loads(out.read_text())
        return {"config": name, "shape": name.split()[0], "status": "crashed", "returncode": proc.returncode,
                "error": (proc.stderr or proc.stdout)[-800:]}


def summarize(data: dict) -> dict:
    """Floors of the paged rows (bytes moved / measured bandwidth) and the targets, from the measured rows."""
    bw = data.get("link", {}).get("bandwidth", {})
    rows = {r["config"]: r for r in data["runs"] if r.get("status") == "ok"}
    out: dict[str, Any] = {}
    for name, r in rows.items():
        if "bytes_moved_per_step" in r and bw:
            each_way = r["bytes_moved_per_step"] / 2
            out[name] = {"transfer_floor_ms": each_way / (bw["both_ways_each_gbps"] * 1e9) * 1e3,
                         "step_ms": r["step_ms"]["median"]}
    return out


def print_table(data: dict) -> None:
    head = f"{'config':<52} {'status':<7} {'peak GiB':>9} {'step ms':>9} {'tok/s':>8} {'host GiB':>9}"
    print(head)
    print("-" * len(head))

    def fmt(v: Any, spec: str) -> str:
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    for r in data["runs"]:
        print(f"{r['config']:<52} {r.get('status', '?'):<7} {fmt(r.get('peak_allocated_gib'), '9.2f'):>9} "
              f"{fmt(r.get('step_ms', {}).get('median'), '9.1f'):>9} {fmt(r.get('tokens_per_s'), '8.0f'):>8} "
              f"{fmt(r.get('host_memory', {}).get('peak_rss_gib'), '9.2f'):>9}  {r.get('error', '')[:80]}")
    bw = data.get("link", {}).get("bandwidth")
    if bw:
        print(f"link: {bw['to_gpu_gbps']:.1f} GB/s in, {bw['to_host_gbps']:.1f} out, "
              f"{bw['both_ways_each_gbps']:.1f} each way at once")


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return None
    t_start = time.perf_counter()
    data: dict[str, Any] = {
        "note": "Llama-architecture models with RANDOM weights, bf16, activation checkpointing, one process per "
                "configuration (host peak RSS is each run's own). Times: CUDA events around a whole step with "
                "every stream synchronized; median, min and max of the timed steps after warm-up.",
        "command": ["python", "bench/paged_gpu.py", *[a for a in argv if not a.startswith("/")]],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("out", "child", "child_out")},
        "shapes": {k: dataclasses.asdict(SHAPES[k]) | CONFIG_OVERRIDES.get(k, {}) for k in SHAPES},
        "runs": [],
    }
    data["link"] = run_child("link", args, argv, args.time_budget)
    data["environment"] = data["link"].pop("environment", None)
    print(json.dumps(data["link"], indent=1), flush=True)
    save_json(args.out, data)
    for name, _, _ in configs(args):
        left = args.time_budget - (time.perf_counter() - t_start)
        if left < 20:
            data["runs"].append({"config": name, "shape": name.split()[0], "status": "skipped",
                                 "error": "--time-budget spent"})
            continue
        print(f"running {name} ...", flush=True)
        row = run_child(name, args, argv, left)
        data["runs"].append(row)
        print(f"  {row.get('status')} {row.get('tokens_per_s', '')} tok/s, peak {row.get('peak_allocated_gib')} GiB"
              f" {row.get('error', '')[:200]}", flush=True)
        save_json(args.out, data)
    data["summary"] = summarize(data)
    data["total_seconds"] = time.perf_counter() - t_start
    save_json(args.out, data)
    print_table(data)
    return data


if __name__ == "__main__":
    main()
