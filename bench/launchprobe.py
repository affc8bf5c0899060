"""What the launch cache saves on the host: the host time of one Triton call, cache off and on, on a GPU.

`python -m bench.launchprobe OUT.json` calls each of minilora's NF4 entry points at 4096² back to back (2000
calls, then one synchronize; 5 repeats, median and spread) with `kernels.nf4.LAUNCH_CACHE` off, then on, and
divides the host's wall time by the count. The kernels take less time than their launches (a 4096² dequantize
runs ~19 µs on an H100, its launch longer), so the queue never fills and the figure is the host's time per
call, not the GPU's. Rows beside them: one small PyTorch operation and `torch.empty` of the output, for scale,
and Triton's own `kernel[grid](...)` with every argument ready. Each cached row is checked to write what the
uncached one wrote.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Callable

import torch
import triton

from bench.common import versions, write_json
from minilora import kernels
from minilora.kernels import nf4 as nf4_kernels
from minilora.kernels.nf4 import DEQUANT_CONFIG, _nf4_dequantize_kernel, cdiv, device_tables


def host_us(fn: Callable[[], object], calls: int = 2000, repeats: int = 5) -> dict:
    """Host microseconds per call of `fn`, called `calls` times back to back: median and range of `repeats`."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return {"host_us": statistics.median(per_call), "min_us": min(per_call), "max_us": max(per_call),
            "calls": calls, "repeats": repeats}


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench.launchprobe times launches on a GPU; this machine has none")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    q = kernels.quantize((torch.randn(4096, 4096, device=dev) * 0.02).bfloat16(), 64, True)
    A = (torch.randn(16, 4096, device=dev) / 64).bfloat16()
    B = (torch.randn(4096, 16, device=dev) / 10).bfloat16()
    out = torch.empty(4096, 4096, device=dev, dtype=torch.bfloat16)
    small = torch.zeros(16, device=dev)
    # Triton's own launch, every argument ready: the dequantize kernel's call as the library makes it
    table, _, map8 = device_tables(dev)
    dq, packed = q.absmax, q.packed.reshape(-1)
    block = max(DEQUANT_CONFIG["block"], q.blocksize)
    args = (packed, dq.scales, dq.codes, map8, dq.scales, dq.offset.reshape(1), table, out, q.numel,
            packed.numel(), q.n_blocks)
    meta = dict(BLOCKSIZE=q.blocksize, BLOCK=block, DOUBLE_QUANT=True, DQ_BLOCKSIZE=dq.scale_blocksize,
                INTERPRETED=False, num_warps=DEQUANT_CONFIG["num_warps"], enable_fp_fusion=False)
    grid = (cdiv(q.numel, block),)

    entry = {
        "dequantize_nf4_triton(q, out=out)": lambda: kernels.dequantize_nf4_triton(q, torch.bfloat16, out=out),
        "dequantize(q) (allocates its output)": lambda: kernels.dequantize(q, torch.bfloat16),
        "nf4_lora_weight_triton(q, A, B) (W' build)": lambda: kernels.nf4_lora_weight_triton(q, A, B, 2.0,
                                                                                            torch.bfloat16),
        "launch(kernel, grid, ...), arguments ready": lambda: nf4_kernels.launch(_nf4_dequantize_kernel, grid,
                                                                                 *args, **meta),
    }
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "versions": versions() | {"triton": triton.__version__}, "shape": "4096x4096 NF4+DQ", "rows": []}

    def rec(name: str, cache: bool | None, fn: Callable[[], object]) -> None:
        row = {"name": name, "launch_cache": cache} | host_us(fn)
        res["rows"].append(row)
        print(f"{name:<46} cache {str(cache):<5} host {row['host_us']:7.2f} us/call "
              f"[{row['min_us']:.2f}-{row['max_us']:.2f}]", flush=True)

    rec("small.add_(1) (one PyTorch operation)", None, lambda: small.add_(1))
    rec("torch.empty 4096² bf16", None, lambda: torch.empty(4096, 4096, device=dev, dtype=torch.bfloat16))
    rec("kernel[grid](...), arguments ready", None, lambda: _nf4_dequantize_kernel[grid](*args, **meta))
    written = {}
    for cache in (False, True):
        nf4_kernels.LAUNCH_CACHE = cache
        for name, fn in entry.items():
            rec(name, cache, fn)
        written[cache] = (kernels.dequantize_nf4_triton(q, torch.bfloat16).clone(),
                          kernels.nf4_lora_weight_triton(q, A, B, 2.0, torch.bfloat16).clone())
    res["cached_writes_equal"] = all(torch.equal(a, b) for a, b in zip(written[False], written[True]))
    print("cached launches write what uncached ones do:", res["cached_writes_equal"])
    write_json(sys.argv[1], res)


if __name__ == "__main__":
    main()
