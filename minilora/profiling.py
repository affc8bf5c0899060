"""Measuring tools every chapter uses: which device, how long, how much memory, and where a figure came from.

No number in the course is shown without the record of the machine that produced it (`environment()`).
Timing follows one rule everywhere: warm up, repeat, report the median with its spread (quartiles, min,
max). On a GPU the clock is a pair of CUDA events around the work, which times the stream, host gaps
included (see `time_fn`); on a CPU it is `time.perf_counter`. Two variants serve the kernel figures:
`time_rotating` cycles through distinct inputs (none of them cached), `time_queued` keeps the host's launch
time out of a GPU's figure; `measure_ceilings` gives the copy bandwidth and matmul rate that predictions
are set against.
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib.metadata as _md
import os
import platform
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch

__all__ = [
    "pick_device",
    "supports_bf16",
    "train_dtype",
    "Timing",
    "time_fn",
    "time_rotating",
    "time_queued",
    "measure_ceilings",
    "peak_memory",
    "SavedTensorBytes",
    "environment",
    "describe",
    "seed_everything",
    "cuda_memory_scope",
]


def pick_device() -> torch.device:
    """CUDA when present, else CPU. `MINILORA_DEVICE=cpu|cuda` overrides (MPS only when asked for)."""
    wanted = os.environ.get("MINILORA_DEVICE", "").strip().lower()
    if wanted:
        if wanted.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"MINILORA_DEVICE={wanted} but torch sees no CUDA device")
        return torch.device(wanted)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def supports_bf16(device: torch.device | str) -> bool:
    """bf16 matmuls in hardware: Ampere (sm_80) or newer. CPUs run bf16 too, but emulated and slowly."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def train_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype a chapter trains in on this device: bf16 where the GPU has it, else fp32."""
    return torch.bfloat16 if supports_bf16(device) else torch.float32


def seed_everything(seed: int = 0) -> None:
    """Seed Python's and torch's generators (torch seeds every GPU too), so a chapter's numbers repeat."""
    import random

    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Timing:
    """Median and spread of repeated runs, in milliseconds: quartiles (q1, q3), their gap (IQR), min, max."""

    median_ms: float
    min_ms: float
    max_ms: float
    reps: int
    clock: str  # "cuda-events" or "perf_counter"
    q1_ms: float = float("nan")
    q3_ms: float = float("nan")

    @property
    def iqr_ms(self) -> float:
        """Interquartile range: the middle half of the repeats lies within this many ms."""
        return self.q3_ms - self.q1_ms

    def __str__(self) -> str:
        return (f"{self.median_ms:.3f} ms (median of {self.reps}, IQR {self.q1_ms:.3f}-{self.q3_ms:.3f}, "
                f"{self.clock})")


def time_fn(fn: Callable[[], object], *, warmup: int = 5, reps: int = 30,
            device: torch.device | str | None = None) -> Timing:
    """Time `fn()`: `warmup` untimed calls, then `reps` timed ones; report the median, quartiles, min, max.

    On CUDA each call sits between two events recorded on the current stream, and the time is what elapses
    on that stream from the first event to the second. That is the GPU's time for `fn` only while the host
    keeps ahead of the GPU. When the host is slower (small kernels, many launches, Python overhead), the
    second event is recorded only when the host reaches it, the GPU idles in between, and the figure is the
    host's pace: launch time included. `time_queued` queues the calls behind a spin kernel first and so
    measures the GPU alone; the two agree when the GPU is the bottleneck. On CPU, `perf_counter` around each
    call, which is wall-clock time on a machine other processes share: read the IQR before comparing medians.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    device = torch.device(device) if device is not None else pick_device()
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in pairs:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in pairs]
        clock = "cuda-events"
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        clock = "perf_counter"
    spread = _spread(times)
    return Timing(spread["median_ms"], spread["min_ms"], spread["max_ms"], reps, clock,
                  q1_ms=spread["q1_ms"], q3_ms=spread["q3_ms"])


def _spread(times: list[float]) -> dict[str, Any]:
    """Median, quartiles, IQR, min and max of a list of times in ms."""
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
    return {"median_ms": statistics.median(times), "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1,
            "min_ms": min(times), "max_ms": max(times)}


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
    return {**_spread(times), "reps": reps, "buffers": len(fns), "clock": clock}


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
    return {**_spread(times), "reps": reps, "buffers": len(fns), "clock": "cuda-events, queued",
            "host_ms_per_call": 1e3 * queue_s / reps, "spin_ms": spin / 2.0e6}


def measure_ceilings(device: torch.device | str, *, warmup: int = 5, reps: int = 30) -> dict[str, float]:
    """What the device can do at best: device-to-device copy bandwidth (bytes read + written, TB/s) and the
    rate of a large bf16 matmul (TFLOP/s). On a GPU: 512 MiB copied, 8192² matmul; on a CPU, toy sizes."""
    device = torch.device(device)
    n = 2**28 if device.type == "cuda" else 2**20  # 512 MiB of bf16 on a GPU
    a = torch.randn(n, device=device, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    t = time_fn(lambda: b.copy_(a), warmup=warmup, reps=reps, device=device)
    copy_tbs = 2 * a.numel() * a.element_size() / (t.median_ms * 1e-3) / 1e12
    del a, b
    k = 8192 if device.type == "cuda" else 256
    x = torch.randn(k, k, device=device, dtype=torch.bfloat16)
    y = torch.randn(k, k, device=device, dtype=torch.bfloat16)
    t = time_fn(lambda: x @ y, warmup=warmup, reps=reps, device=device)
    tflops = 2 * k**3 / (t.median_ms * 1e-3) / 1e12
    del x, y
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    return {"copy_TBps": copy_tbs, "matmul_bf16_TFLOPs": tflops, "matmul_size": k}


def peak_memory(fn: Callable[[], object], device: torch.device | str | None = None) -> int:
    """Peak bytes allocated on a CUDA device while `fn()` runs (the allocator's own count).

    The peak counter is reset first, so the result covers `fn` alone plus whatever was already resident.
    CPUs have no such counter in torch; use `SavedTensorBytes` and analytic byte counts there.
    """
    device = torch.device(device) if device is not None else pick_device()
    if device.type != "cuda":
        raise RuntimeError("peak_memory needs a CUDA device; on a CPU count bytes with SavedTensorBytes")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


class SavedTensorBytes:
    """Bytes autograd keeps for backward while the block runs: the activation memory of a forward pass.

    Works on any device, because it counts what autograd stores rather than asking an allocator. Tensors
    that share storage are counted once. Pass the model's parameters as `exclude`: autograd often saves a
    view of a weight (its transpose), which is resident anyway and is no activation.

        with SavedTensorBytes(exclude=model.parameters()) as saved:
            loss = model(x).sum()
        saved.bytes   # activations held for backward
    """

    def __init__(self, exclude: Iterator[torch.Tensor] | None = None) -> None:
        self._seen: set[tuple[str, int]] = set()
        self._exclude = {self._key(t) for t in (exclude or [])}
        self.bytes = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @staticmethod
    def _key(t: torch.Tensor) -> tuple[str, int]:
        return (str(t.device), t.untyped_storage().data_ptr())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = self._key(t)
        if key not in self._seen and key not in self._exclude and not isinstance(t, torch.nn.Parameter):
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self) -> "SavedTensorBytes":
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def _version(pkg: str) -> str | None:
    try:
        return _md.version(pkg)
    except _md.PackageNotFoundError:
        return None


@dataclass
class Environment:
    """Where a figure was measured: device, library versions, date."""

    device: str
    device_name: str
    torch: str
    cuda: str | None
    driver: str | None
    gpu_memory_gib: float | None
    python: str
    packages: dict[str, str | None] = field(default_factory=dict)
    date: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        pk = ", ".join(f"{k} {v}" for k, v in self.packages.items() if v)
        mem = f", {self.gpu_memory_gib:.0f} GiB" if self.gpu_memory_gib else ""
        cuda = f", CUDA {self.cuda}" if self.cuda else ""
        drv = f", driver {self.driver}" if self.driver else ""
        return (f"{self.device_name}{mem} | torch {self.torch}{cuda}{drv} | python {self.python} | "
                f"{pk} | {self.date}")


def _driver_version() -> str | None:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def environment(device: torch.device | str | None = None) -> Environment:
    """Record of the machine and software a measurement ran on. Print it next to every figure."""
    device = torch.device(device) if device is not None else pick_device()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, mem, driver = props.name, props.total_memory / 2**30, _driver_version()
    else:
        name, mem, driver = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", None, None
    pkgs = {p: _version(p) for p in ("minilora", "transformers", "peft", "bitsandbytes")}
    return Environment(
        device=str(device), device_name=name, torch=torch.__version__,
        cuda=torch.version.cuda if device.type == "cuda" else None, driver=driver, gpu_memory_gib=mem,
        python=platform.python_version(), packages=pkgs,
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )


def describe(device: torch.device | str | None = None) -> str:
    """One line for a notebook's first cell: the device and versions its figures come from."""
    return str(environment(device))


@contextmanager
def cuda_memory_scope(device: torch.device | str) -> Iterator[dict]:
    """Peak and end-of-block CUDA memory of a `with` block, in bytes: `{"peak": ..., "end": ...}`."""
    device = torch.device(device)
    out: dict = {}
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        yield out
    finally:
        torch.cuda.synchronize(device)
        out["peak"] = torch.cuda.max_memory_allocated(device)
        out["end"] = torch.cuda.memory_allocated(device)
