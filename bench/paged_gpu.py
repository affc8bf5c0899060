"""Paged AdamW on a GPU: equality with torch.optim.AdamW, then peak memory and step time of full fine-tuning.

Models are Llama-architecture (`transformers.LlamaConfig` + `LlamaForCausalLM`) with RANDOM weights: memory and
time do not depend on the weights' values, and no checkpoint has to be downloaded.

1. Equality: a small fp32 model trained 5 steps; the same gradients go to torch.optim.AdamW (foreach and
   single-tensor) and to minilora's PagedAdamW (with a small GPU budget, so parameters span many chunks).
2. Full fine-tuning (bf16 weights, gradient checkpointing, model.train()) of a ~1B shape with torch AdamW and
   PagedAdamW: peak GPU memory, median step time (CUDA events), tokens/s. `--big` adds an 8B shape, where
   torch AdamW may run out of memory on an 80 GB GPU (recorded as "oom"); PagedAdamW keeps its fp32 moments
   in host memory.
3. bitsandbytes' PagedAdamW on the ~1B shape, if bitsandbytes imports with CUDA. It runs last, because
   bitsandbytes never frees its paged (CUDA managed) buffers.

    python bench/paged_gpu.py --out results/paged_gpu.json --big      # on a GPU, about 3-5 minutes
    python bench/paged_gpu.py --out /tmp/paged_cpu.json --device cpu --tiny   # smoke test without a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing minilora
from minilora.memory import LLAMA_SHAPES, LlamaShape, build_llama  # noqa: E402
from minilora.paged import PagedAdamW  # noqa: E402
from minilora.profiling import environment  # noqa: E402

GIB = 2**30

# Llama-architecture shapes. "1B" is TinyLlama-1.1B's, "8B" Llama-3-8B's; both keep grouped-query attention.
SHAPES: dict[str, LlamaShape] = {
    "tiny": LlamaShape(hidden=64, intermediate=172, layers=2, heads=4, kv_heads=2, vocab=512),
    "small": LlamaShape(hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4, vocab=2048),
    "1B": LLAMA_SHAPES["TinyLlama-1.1B"],
    "8B": LLAMA_SHAPES["Llama-3-8B"],
}
CONFIG_OVERRIDES: dict[str, dict[str, Any]] = {"8B": dict(rope_theta=500000.0)}  # Llama-3's RoPE base


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
    """This process's resident and peak resident host memory, and the machine's total, in GiB (Linux)."""
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


def free_memory(device: torch.device) -> None:
    """Return cached GPU memory and cached pinned host memory, so the next run starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        empty_host = getattr(getattr(torch, "accelerator", None), "memory", None)
        if empty_host is not None and hasattr(empty_host, "empty_host_cache"):
            empty_host.empty_host_cache()
        elif hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()


def device_used_gib(device: torch.device) -> float | None:
    """GPU memory in use as the driver sees it: torch's cache, CUDA managed pages, the context."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / GIB


def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int,
                attn: str | None = None) -> torch.nn.Module:
    """A LlamaForCausalLM of `shape` with random weights, created directly on `device` in `dtype`.

    Creating it under a default device and dtype skips building an fp32 copy on the CPU first (for 8B that
    would be 32 GB and minutes of CPU time).
    """
    config = dict(CONFIG_OVERRIDES.get(shape, {}), use_cache=False, max_position_embeddings=4096)
    if attn is not None:
        config["attn_implementation"] = attn
    return build_llama(SHAPES[shape], dtype, device, seed=seed, **config)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant); transformers 5.x renamed the method."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def batch(vocab: int, batch_size: int, seq: int, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch_size, seq), generator=g).to(device)


# ---------------------------------------------------------------------------------------------------------
# 1. Equality


@torch.no_grad()
def _max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b) if x.numel())


def equality_check(device: torch.device, shape: str, steps: int, budget_bytes: int, seq: int) -> dict:
    """Feed identical gradients to torch AdamW (foreach, single-tensor) and PagedAdamW; compare parameters."""
    model = build_model(shape, device, torch.float32, seed=0, attn="eager")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in params]
    single = [p.detach().clone().requires_grad_() for p in params]
    paged = [p.detach().clone().requires_grad_() for p in params]
    hyper = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    opt_ref = torch.optim.AdamW(params, **hyper)  # torch's default: foreach on CUDA
    opt_single = torch.optim.AdamW(single, foreach=False, **hyper)
    opt_paged = PagedAdamW(paged, gpu_budget_bytes=budget_bytes, **hyper)
    losses = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*PagedAdamW runs as plain AdamW")
        for step in range(steps):
            ids = batch(model.config.vocab_size, 2, seq, device, seed=100 + step)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.item())
            for p, s, q in zip(params, single, paged):
                s.grad = p.grad.clone()
                q.grad = p.grad.clone()
            for opt in (opt_ref, opt_single, opt_paged):
                opt.step()
                opt.zero_grad(set_to_none=True)
    report = opt_paged.memory_report()
    return {
        "shape": shape, "params": sum(p.numel() for p in params), "dtype": "float32", "steps": steps,
        "gpu_budget_bytes": budget_bytes, "chunks_per_step": report.last_step_chunks,
        "paged_path": device.type == "cuda",
        "losses": losses,
        "max_abs_diff_paged_vs_torch_foreach": _max_abs_diff(paged, params),
        "max_abs_diff_paged_vs_torch_single_tensor": _max_abs_diff(paged, single),
        "max_abs_diff_torch_foreach_vs_single_tensor": _max_abs_diff(params, single),
        "max_abs_param_change": _max_abs_diff(paged, initial),
        "note": "the same gradients go to all three optimizers; the foreach-vs-single-tensor diff is torch's own "
                "floating-point noise floor",
    }


# ---------------------------------------------------------------------------------------------------------
# 2. Full fine-tuning: memory and time


def _timed_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, n: int,
                 device: torch.device) -> tuple[list[float], list[float], list[float]]:
    """Run n training steps; per step: total, forward+backward and optimizer milliseconds."""
    total, fwd_bwd, optim = [], [], []
    for _ in range(n):
        if device.type == "cuda":
            e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            e0.record()
            model(input_ids=ids, labels=ids).loss.backward()
            e1.record()
            opt.step()
            opt.zero_grad(set_to_none=True)
            e2.record()
            e2.synchronize()
            t_fb, t_opt = e0.elapsed_time(e1), e1.elapsed_time(e2)
        else:
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            t1 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t_fb, t_opt = (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3
        total.append(t_fb + t_opt)
        fwd_bwd.append(t_fb)
        optim.append(t_opt)
    return total, fwd_bwd, optim


def _state_bytes(opt: torch.optim.Optimizer) -> dict[str, int]:
    """Optimizer state tensors by device type (bitsandbytes' paged buffers are CPU-typed managed memory)."""
    out: dict[str, int] = {}
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                kind = "managed" if getattr(v, "is_paged", False) else v.device.type
                out[kind] = out.get(kind, 0) + v.nbytes
    return out


def _state_label(opt: torch.optim.Optimizer) -> str:
    """Where the moments live and in what dtype, in a few words for the table."""
    if isinstance(opt, PagedAdamW):
        if not any(p.is_cuda for p in opt.state):
            return "CPU fp32 (plain AdamW, nothing to page)"
        report = opt.memory_report()
        pinned = report.host_pinned_bytes == report.host_state_bytes
        return "host fp32 " + ("pinned" if pinned else "PAGEABLE (pinning failed)")
    kinds = _state_bytes(opt)
    if "managed" in kinds:
        return "CUDA managed fp32"
    dtypes = sorted({str(v.dtype).replace("torch.", "") for st in opt.state.values() for k, v in st.items()
                     if torch.is_tensor(v) and k != "step"})
    return f"{'GPU' if 'cuda' in kinds else 'CPU'} {'/'.join(dtypes)}"


def finetune_run(name: str, make_opt: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], shape: str,
                 device: torch.device, args: argparse.Namespace) -> dict:
    """Build the model, train warmup + reps steps, and record memory and time; OOM is a result, not a crash."""
    result: dict[str, Any] = {"shape": shape, "optimizer": name, "batch": args.batch, "seq": args.seq,
                              "weights": "bf16, random" if device.type == "cuda" else "fp32, random",
                              "gradient_checkpointing": True}
    free_memory(device)
    baseline = device_used_gib(device)
    model = opt = params = None
    t_start = time.perf_counter()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("default")
        try:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            model = build_model(shape, device, dtype, seed=0)
            enable_checkpointing(model)
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            result.update(params=sum(p.numel() for p in params), weights_gib=sum(p.nbytes for p in params) / GIB)
            opt = make_opt(params)
            ids = batch(model.config.vocab_size, args.batch, args.seq, device, seed=1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            _timed_steps(model, opt, ids, 1, device)  # the first step also allocates the optimizer state
            result["first_step_s"] = time.perf_counter() - t0
            _timed_steps(model, opt, ids, args.warmup - 1, device)
            total, fwd_bwd, optim = _timed_steps(model, opt, ids, args.reps, device)
            median_ms = statistics.median(total)
            result.update(
                status="ok", reps=args.reps, warmup=args.warmup, median_step_ms=median_ms,
                median_fwd_bwd_ms=statistics.median(fwd_bwd), median_optimizer_ms=statistics.median(optim),
                step_ms_all=total, tokens_per_s=args.batch * args.seq / (median_ms / 1e3),
                clock="cuda-events" if device.type == "cuda" else "perf_counter",
                optimizer_state_bytes=_state_bytes(opt))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
                result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
                used = device_used_gib(device)
                result["device_used_gib_after"] = used
                result["device_used_gib_over_baseline"] = None if used is None or baseline is None else used - baseline
            result["optimizer_state"] = _state_label(opt)
            if isinstance(opt, PagedAdamW):
                report = opt.memory_report()
                result["paged_report"] = report.as_dict()
                result["host_state_pinned"] = report.host_pinned_bytes == report.host_state_bytes
                moved = report.last_step_bytes_to_gpu + report.last_step_bytes_to_host
                result["optimizer_bytes_moved_per_step_gib"] = moved / GIB
                result["effective_transfer_gb_per_s"] = moved / 1e9 / (result["median_optimizer_ms"] / 1e3)
            result["host_memory"] = host_memory()
        except torch.cuda.OutOfMemoryError as err:
            # The traceback (and the tensors its frames hold) goes away at the end of this block.
            result.update(status="oom", error=str(err).strip().splitlines()[0][:300])
        except Exception as err:  # noqa: BLE001 - a failed run is recorded and the others still run
            result.update(status="error", error=f"{type(err).__name__}: {str(err).strip()[:300]}")
        finally:
            del model, opt, params
            free_memory(device)
    caught = sorted({str(w.message)[:300] for w in records})
    result["wall_s"] = time.perf_counter() - t_start
    if caught:
        result["warnings"] = caught
    return result


def bnb_paged_adamw() -> tuple[Callable | None, str]:
    """bitsandbytes' PagedAdamW if it imports with CUDA, and a line saying what happened."""
    if not torch.cuda.is_available():
        return None, "skipped: no CUDA"
    try:
        import bitsandbytes as bnb
    except Exception as err:  # noqa: BLE001 - any import failure means "not available here"
        return None, f"skipped: bitsandbytes does not import ({type(err).__name__}: {err})"
    cls = getattr(getattr(bnb, "optim", None), "PagedAdamW", None)
    if cls is None:
        return None, "skipped: bitsandbytes has no optim.PagedAdamW"
    return cls, f"bitsandbytes {getattr(bnb, '__version__', '?')}"


# ---------------------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes only (a smoke test; use with --device cpu)")
    parser.add_argument("--big", action="store_true", help="also the 8B shape (needs ~80 GB of host RAM)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (1 or 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 512; 32 with --tiny)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--budget-mib", type=int, default=256, help="PagedAdamW gpu_budget_bytes, in MiB")
    parser.add_argument("--equality-steps", type=int, default=5)
    parser.add_argument("--skip-bnb", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device (use --device cpu --tiny for a smoke test)")
    if args.big and (args.device == "cpu" or args.tiny):
        parser.error("--big needs a GPU and full-size shapes (drop --tiny, use --device cuda)")
    if args.seq is None:
        args.seq = 32 if args.tiny else 512
    for name in ("batch", "seq", "reps", "budget_mib", "equality_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step allocates the optimizer state)")
    return args


def print_table(data: dict) -> None:
    eq = data.get("equality", {})
    print(f"\nequality ({eq.get('shape')}, {eq.get('steps')} steps, {eq.get('chunks_per_step')} chunks/step): "
          f"max |paged - torch foreach| = {eq.get('max_abs_diff_paged_vs_torch_foreach'):.3g}, "
          f"max |paged - torch single| = {eq.get('max_abs_diff_paged_vs_torch_single_tensor'):.3g}, "
          f"torch noise floor = {eq.get('max_abs_diff_torch_foreach_vs_single_tensor'):.3g}")
    head = (f"{'shape':<6} {'optimizer':<26} {'status':<7} {'peak GiB':>9} {'step ms':>9} {'optim ms':>9} "
            f"{'tok/s':>9}  state")
    print(head)
    print("-" * len(head))

    def fmt(v: Any, spec: str) -> str:
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    for r in data.get("runs", []):
        print(f"{r['shape']:<6} {r['optimizer']:<26} {r.get('status', '?'):<7} "
              f"{fmt(r.get('peak_allocated_gib'), '9.2f'):>9} {fmt(r.get('median_step_ms'), '9.1f'):>9} "
              f"{fmt(r.get('median_optimizer_ms'), '9.1f'):>9} {fmt(r.get('tokens_per_s'), '9.0f'):>9}  "
              f"{r.get('optimizer_state', r.get('error', ''))[:60]}")
    print(f"({data['environment'].get('device_name')}; {data.get('note_short')})")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    t_start = time.perf_counter()
    env = environment(device)
    shapes = ("tiny",) if args.tiny else ("small", "1B", "8B") if args.big else ("small", "1B")
    data: dict[str, Any] = {
        "note": "Llama-architecture models from transformers.LlamaConfig with RANDOM weights (no checkpoint). "
                "torch.optim.AdamW keeps its moments in the parameter dtype (bf16 here) on the GPU; minilora "
                "PagedAdamW keeps fp32 moments in (pinned) host memory and streams them through the GPU each "
                "step; bitsandbytes PagedAdamW keeps fp32 moments in CUDA managed memory, which "
                "torch.cuda.max_memory_allocated does not see (device_used_gib_* does).",
        "note_short": "random weights; peak = torch.cuda.max_memory_allocated",
        "command": [sys.executable, *sys.argv],
        "environment": env.as_dict(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "shapes": {k: dataclasses.asdict(SHAPES[k]) | CONFIG_OVERRIDES.get(k, {}) for k in shapes},
        "runs": [],
    }
    print(env)

    data["equality"] = equality_check(device, "tiny" if args.tiny else "small", args.equality_steps,
                                      budget_bytes=(4 * 2**10 if args.tiny else 4 * 2**20), seq=args.seq)
    save_json(args.out, data)

    budget = args.budget_mib * 2**20
    shape = "tiny" if args.tiny else "1B"
    cases: list[tuple[str, Callable, str]] = [
        ("torch.optim.AdamW", lambda ps: torch.optim.AdamW(ps, lr=1e-5), shape),
        ("minilora.PagedAdamW", lambda ps: PagedAdamW(ps, lr=1e-5, gpu_budget_bytes=budget), shape),
    ]
    if args.big:
        cases += [("torch.optim.AdamW", lambda ps: torch.optim.AdamW(ps, lr=1e-5), "8B"),
                  ("minilora.PagedAdamW", lambda ps: PagedAdamW(ps, lr=1e-5, gpu_budget_bytes=budget), "8B")]
    bnb_cls, bnb_status = (None, "skipped: --skip-bnb") if args.skip_bnb else bnb_paged_adamw()
    data["bitsandbytes"] = bnb_status
    if bnb_cls is not None:  # last: bitsandbytes never frees its managed buffers
        cases.append(("bitsandbytes.PagedAdamW", lambda ps: bnb_cls(ps, lr=1e-5), shape))

    for name, make_opt, case_shape in cases:
        print(f"running {case_shape} with {name} ...", flush=True)
        data["runs"].append(finetune_run(name, make_opt, case_shape, device, args))
        save_json(args.out, data)

    data["host_memory_end"] = host_memory()
    data["total_seconds"] = time.perf_counter() - t_start
    save_json(args.out, data)
    print_table(data)
    print(f"wrote {args.out} in {data['total_seconds']:.0f} s")
    return data


if __name__ == "__main__":
    main()
