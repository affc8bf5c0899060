"""Benchmark of minilora's fused layers and NF4 kernels against PEFT and bitsandbytes, side by side.

    python -m bench [--quick] [--train] [--out DIR] [--device cuda|cpu]
                    [--sections layers,nf4,host,train,buildsweep,paths]

Run from the repository root. Everything runs in one process on one device, with the same inputs for
minilora and its peer. Each row is checked first (relative error ‖out − ref‖/‖ref‖ of the output and of
every gradient against a float32 evaluation of the same formula; bit equality for NF4) and only timed if it
agrees. Times are medians of CUDA-event timings after warm-up (`minilora.profiling.time_fn`); peak memory
is the allocator's peak during one call, with the row's own inputs and weights resident.

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
  buildsweep  (on request) W' = W0 + s·B A for an NF4+DQ and a dense bf16 W0 at the four shapes of a
          Llama-3-8B layer's projections: each Triton configuration of BUILD_GRID, the PyTorch build, a copy of the same bf16 bytes; GPU time
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
import gc
import os
import sys
import time
import traceback
from dataclasses import asdict
from typing import Any, Callable

import torch

from bench.common import (ALPHA, DTYPE, TOL, R, Row, Settings, plot, summary_table, targets, targets_table,
                          versions, write_json)
from bench.layers import crossover, crossover_text, host_section, layer_section, suggested_crossovers
from bench.nf4 import nf4_section
from bench.sweep import build_summary, build_summary_text, buildsweep_section, paths_section
from bench.train import train_section
from minilora import fast, kernels
from minilora.profiling import environment, measure_ceilings

SECTIONS = ("layers", "nf4", "host", "train", "buildsweep", "paths")


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, set[str], Settings]:
    """The command line: its arguments, the sections to run, the run's settings."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    parser.add_argument("--train", action="store_true", help="also time Llama-shaped training steps")
    parser.add_argument("--out", default="bench_out", help="directory for bench.json and bench.png")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--sections", default=None, help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    sections = set((args.sections or "layers,nf4,host" + (",train" if args.train else "")).split(","))
    unknown = sections - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if device.type == "cuda":
        cfg = Settings(device, args.quick, warmup=5, reps=10 if args.quick else 30)
    else:
        cfg = Settings(device, True, warmup=1, reps=2)
    return args, sections, cfg


def _import_peers() -> None:
    for optional in ("peft", "bitsandbytes", "transformers", "matplotlib"):
        try:  # imported up front, so that gc.freeze() below covers their objects
            __import__(optional)
        except ImportError:
            print(f"# {optional} is not installed: its rows will report errors", flush=True)
    # Rows free their layers through gc (PEFT modules hold reference cycles); freezing the long-lived objects
    # of the imports keeps each collection fast.
    gc.collect()
    gc.freeze()


def _header(cfg: Settings, env: Any) -> dict[str, Any]:
    """What bench.json records before any row: environment, versions, settings and the constants in force."""
    return {"environment": env.as_dict(), "versions": versions(), "argv": sys.argv[1:],
            "settings": {"quick": cfg.quick, "warmup": cfg.warmup, "reps": cfg.reps,
                         "rank": R, "alpha": ALPHA, "dtype": str(DTYPE), "tolerance": TOL,
                         "MERGE_CROSSOVER": fast.MERGE_CROSSOVER,
                         "DEQUANT_CONFIG": kernels.DEQUANT_CONFIG,
                         "QUANT_CONFIG": kernels.QUANT_CONFIG,
                         "LORA_WEIGHT_CONFIG": kernels.LORA_WEIGHT_CONFIG,
                         "MERGE_CROSSOVER_FREE_BUILD": fast.MERGE_CROSSOVER_FREE_BUILD,
                         "TRITON_BUILD": fast.TRITON_BUILD},
            "triton_usable": kernels.triton_usable(cfg.device)}


def _ceilings(cfg: Settings) -> dict[str, Any]:
    try:
        ceilings = measure_ceilings(cfg.device, warmup=cfg.warmup, reps=cfg.reps)
        print(f"# ceilings: {ceilings}", flush=True)
        return ceilings
    except Exception as err:  # noqa: BLE001
        return {"error": repr(err)[:500]}


def _run_sections(cfg: Settings, sections: set[str], results: dict[str, Any], out: str) -> list[Row]:
    """Run the chosen sections in a fixed order; bench.json is written after each one, so a crash later
    keeps what was measured. A section that raises becomes one error row, and the others still run."""
    copy_tbps = results["ceilings"].get("copy_TBps")
    runs: list[tuple[str, Callable[[], list[Row]]]] = [
        ("buildsweep", lambda: buildsweep_section(cfg, copy_tbps)), ("paths", lambda: paths_section(cfg)),
        ("layers", lambda: layer_section(cfg)), ("nf4", lambda: nf4_section(cfg, copy_tbps)),
        ("host", lambda: host_section(cfg)), ("train", lambda: train_section(cfg))]
    rows: list[Row] = []
    for section, run in runs:
        if section not in sections:
            continue
        t0 = time.time()
        try:
            rows += run()
        except Exception as err:  # noqa: BLE001 - the other sections still run
            rows.append(Row(section, "section", "-", status="error", info={"error": repr(err)[:500],
                                                                          "trace": traceback.format_exc()[-2000:]}))
        results.setdefault("section_seconds", {})[section] = time.time() - t0
        results["rows"] = [asdict(r) for r in rows]
        write_json(os.path.join(out, "bench.json"), results)
    return rows


def _summarize(rows: list[Row], sections: set[str], results: dict[str, Any]) -> None:
    """The figures computed from all rows: crossover, build summary, targets."""
    if sections & {"layers", "paths"}:
        results["crossover"] = crossover(rows)
        results["suggested"] = suggested_crossovers(results["crossover"])
    if "buildsweep" in sections:
        results["build_summary"] = build_summary(rows)
    results["rows"] = [asdict(r) for r in rows]
    results["targets"] = targets(rows)


def _print_report(rows: list[Row], results: dict[str, Any], env: Any, out: str) -> None:
    print(f"\n# {env}\n# versions {results['versions']}\n# ceilings {results['ceilings']}")
    print(summary_table(rows))
    failed = [r for r in rows if r.status not in ("ok",) and not r.status.startswith("skipped")]
    print(f"# {len(rows)} rows, {len(failed)} not ok, {results['seconds']:.0f} s; wrote {out}/bench.json")
    print(targets_table(results["targets"]))
    # last, the lines that set constants (bench/NOTES.md, "Setting the constants")
    if "build_summary" in results:
        print(build_summary_text(results["build_summary"]))
    if results.get("crossover"):
        print(crossover_text(results["crossover"]))


def main(argv: list[str] | None = None) -> int:
    args, sections, cfg = _parse(argv)
    _import_peers()
    env = environment(cfg.device)
    print(f"# python -m bench on {env}", flush=True)
    started = time.time()
    results = _header(cfg, env)
    results["ceilings"] = _ceilings(cfg)
    rows = _run_sections(cfg, sections, results, args.out)
    _summarize(rows, sections, results)
    results["seconds"] = time.time() - started
    write_json(os.path.join(args.out, "bench.json"), results)
    try:
        plot(rows, os.path.join(args.out, "bench.png"))
    except Exception as err:  # noqa: BLE001
        print(f"# plot failed: {err!r}")
    _print_report(rows, results, env, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
