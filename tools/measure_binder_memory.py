"""Measure each course notebook's peak resident memory on a CPU, as mybinder.org runs it (about 2 GB of RAM).

    python tools/measure_binder_memory.py                          # every course notebook, one at a time
    python tools/measure_binder_memory.py course/06_qlora.ipynb    # only these; the others' entries are kept

Each notebook runs through `tools/run_notebook.py --no-write` with MINILORA_DEVICE=cpu and OMP_NUM_THREADS=1.
The notebook's kernel is a child process of that runner; its peak resident set size is read from the kernel's
own high-water mark (VmHWM in /proc/<pid>/status), which the kernel keeps itself, so polling can be slow and
still miss no short-lived peak. The runner's own memory is not counted: on mybinder.org the Jupyter server
takes its place, in the same 2 GB. A notebook that fails is measured up to the failing cell, and its entry
says so under "error". Results are merged into binder/memory.json (written atomically):

    {"what": "...", "notebooks": {"course/00_memory_wall.ipynb":
        {"peak_mib": ..., "seconds": ..., "machine": ..., "torch": ..., "date": ...[, "error": ...]}, ...}}

tests/test_binder.py checks that every course notebook has an entry and that each fits mybinder.org's limit.
Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "binder" / "memory.json"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
WARN_MIB = 1843  # 1.8 GiB: above this a chapter leaves little of mybinder.org's 2 GB to the Jupyter server
WHAT = ("peak resident set size (VmHWM) of each notebook's kernel, in MiB, run on a CPU with MINILORA_DEVICE=cpu "
        "and OMP_NUM_THREADS=1 by tools/measure_binder_memory.py")


def status_kib(pid: int, field: str) -> int | None:
    """A `field:  N kB` line of /proc/<pid>/status, in KiB (None once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def children(pid: int) -> list[int]:
    """Every descendant of `pid`, from each process's parent in /proc/<pid>/stat."""
    parent: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # after "pid (comm) state"
        parent.setdefault(ppid, []).append(int(d.name))
    found, todo = [], [pid]
    while todo:
        kids = parent.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""


def last_error(log: str) -> str:
    """The last `SomeError: message` line of a failed run's output, without terminal colours."""
    lines = [ANSI.sub("", line).strip() for line in log.splitlines()]
    errors = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b.*:", line)]
    return errors[-1] if errors else (lines[-1] if lines else "no output")


def measure(path: Path, timeout: int, interval: float) -> tuple[int, float, str | None]:
    """(peak RSS of the notebook's kernel in KiB, wall seconds, None or the error that stopped the notebook).

    A notebook that fails is still measured, up to the cell that failed."""
    env = dict(os.environ, MINILORA_DEVICE="cpu", OMP_NUM_THREADS="1", MINILORA_PROGRESS="0")
    cmd = [sys.executable, str(ROOT / "tools" / "run_notebook.py"), "--no-write", "--timeout", str(timeout), str(path)]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        runner = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        peaks: dict[int, int] = {}  # kernel pid -> its VmHWM, the last one read
        while runner.poll() is None:
            for pid in children(runner.pid):
                if "ipykernel" in cmdline(pid):
                    hwm = status_kib(pid, "VmHWM")
                    if hwm is not None:
                        peaks[pid] = max(peaks.get(pid, 0), hwm)
            time.sleep(interval)
        seconds = time.perf_counter() - t0
        log.seek(0)
        text = log.read()
    if not peaks:
        raise RuntimeError(f"{path}: no kernel process was seen:\n{text[-3000:]}")
    return max(peaks.values()), seconds, (last_error(text) if runner.returncode != 0 else None)


def torch_version() -> str:
    import torch

    return torch.__version__


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", type=Path, help="default: every course/*.ipynb")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between reads of the kernel's VmHWM")
    args = ap.parse_args(argv)
    notebooks = args.notebooks or sorted((ROOT / "course").glob("*.ipynb"))
    where = f"CPU ({platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS=1), Python {platform.python_version()}"
    tv, today = torch_version(), datetime.date.today().isoformat()
    failed = 0
    for path in notebooks:
        key = path.resolve().relative_to(ROOT).as_posix()
        try:
            kib, seconds, error = measure(path.resolve(), args.timeout, args.interval)
        except Exception as err:  # keep going: record the others, report this one
            failed += 1
            print(f"FAILED {key}: {err}", file=sys.stderr, flush=True)
            continue
        mib = round(kib / 1024)
        flag = f"  (above {WARN_MIB} MiB)" if mib > WARN_MIB else ""
        print(f"{key}: peak {mib} MiB in {seconds:.0f} s{flag}", flush=True)
        entry = {"peak_mib": mib, "seconds": round(seconds, 1), "machine": where, "torch": tv, "date": today}
        if error is not None:
            failed += 1
            entry["error"] = error  # the peak covers the cells up to this failure only
            print(f"FAILED {key} (peak measured up to the failing cell): {error}", file=sys.stderr, flush=True)
        data = json.loads(args.out.read_text()) if args.out.exists() else {}
        data["what"] = WHAT
        entries = data.setdefault("notebooks", {})
        entries[key] = entry
        data["notebooks"] = dict(sorted(entries.items()))
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
