"""Which part of the NF4+DQ W' build costs what: the build with one piece left out at a time, on a GPU.

`python -m bench.buildprobe OUT.json` times, at two of an 8B layer's shapes (GPU time of the kernels alone,
`time_queued`, 3 distinct weights, 30 calls, median), the library's build, its 1-D dequantize and a copy of as
many bytes, then `probe`: the library's kernel (`minilora.kernels.lora_weight`, NF4 branch, rank 16, whole
tiles) restated with switches, each leaving one piece out or doing it another way --

    LOWRANK 0   no s·B A term (no A, B tiles, no tensor-core product): the tile's dequantization alone
            2   the term as the product's accumulator: dot(s·B, A, acc=deq(W)) (s·B rounded to bf16 first:
                exact for the probe's s = 2, not in general)
    GATHER  1   both values of a byte in one 8-byte load from a 256-entry pair table (one load per byte)
            2   no table at all: the codes themselves as values (wrong numbers; the load's cost)
    DQ      0   no block scales (no 8-bit code, map and group-scale loads)
    ORDER   1   tiles along a row first (the library launches down a column first)
    TILES   2, 4  that many consecutive row tiles per program, in a loop the compiler may pipeline (the next
                tile's loads issued while this one computes)
    STORE   1   W' written with streaming stores (cache modifier .cs: written once, not kept in cache)

-- at the library's tile (bm 32, bn 128, 4 warps). Rows that compute W' are checked against the library's
output (err: max relative difference). A probe, not the library: the switches stay here.
bench/results/buildprobe.json holds call Y's run of every row (none beat the library's build at both
shapes: streaming stores tied at 14336x4096, the accumulator form tied or lost, two or four row tiles per
program lost 15-18%) and, as `earlier`, call W's, made while the working tree held the pair table in the
library (its rows "library ... (pairs)" are that form).
"""
from __future__ import annotations

import math
import sys
import time

import torch
import triton
import triton.language as tl

from bench.common import write_json
from minilora import kernels
from minilora.kernels.lora_weight import _dq_args, nf4_lora_weight_triton
from minilora.kernels.nf4 import device_tables
from minilora.nf4 import NF4_TABLE
from minilora.profiling import time_queued


@triton.jit
def _tile(packed_ptr, code8_ptr, map8_ptr, scale8_ptr, offset_ptr, table_ptr, pair_ptr, b_ptr, a_ptr, out_ptr,
          n_cols, scaling, row0, pid_n,
          RANK: tl.constexpr, BLOCKSIZE: tl.constexpr, DQ_BLOCKSIZE: tl.constexpr, BM: tl.constexpr,
          BN: tl.constexpr, LOWRANK: tl.constexpr, GATHER: tl.constexpr, DQ: tl.constexpr, INTERP: tl.constexpr,
          STORE: tl.constexpr):
    """One (BM, BN) tile of W' = deq(W) + s·B A as the library builds it, with the pieces switched (module doc)."""
    col0 = pid_n * BN
    r = tl.arange(0, BM)
    c = tl.arange(0, BN)
    HALF: tl.constexpr = BN // 2
    NBC: tl.constexpr = BN // BLOCKSIZE
    hb = tl.arange(0, HALF)
    byte = tl.load(packed_ptr + row0 * (n_cols // 2) + col0 // 2 + r[:, None] * (n_cols // 2) + hb[None, :])
    if GATHER == 0:
        codes = tl.join(byte >> 4, byte & 0xF).reshape(BM, BN).to(tl.int32)
        values = tl.load(table_ptr + codes)
    elif GATHER == 1:
        pair = tl.load(pair_ptr + byte.to(tl.int32))
        hi = pair.to(tl.int32).to(tl.float32, bitcast=True)
        lo = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        values = tl.join(hi, lo).reshape(BM, BN)
    else:
        values = tl.join(byte >> 4, byte & 0xF).reshape(BM, BN).to(tl.float32)
    nb = tl.arange(0, NBC)
    block_idx = ((row0 + r) * (n_cols // BLOCKSIZE))[:, None] + (pid_n * NBC + nb)[None, :]
    if DQ:
        code8 = tl.load(code8_ptr + block_idx).to(tl.int32)
        scale8 = tl.load(scale8_ptr + block_idx // DQ_BLOCKSIZE)
        absmax = tl.load(map8_ptr + code8) * scale8 + tl.load(offset_ptr)
        w = (values.reshape(BM, NBC, BLOCKSIZE) * absmax[:, :, None]).reshape(BM, BN)
    else:
        w = values
    if LOWRANK != 0:
        k = tl.arange(0, RANK)
        b_tile = tl.load(b_ptr + (row0 + r)[:, None] * RANK + k[None, :])
        a_tile = tl.load(a_ptr + col0 + c[None, :] + k[:, None] * n_cols)
        if INTERP:
            b_tile = b_tile.to(tl.float32)
            a_tile = a_tile.to(tl.float32)
        if LOWRANK == 1:
            w = w + scaling * tl.dot(b_tile, a_tile, out_dtype=tl.float32)
        else:
            w = tl.dot((b_tile * scaling).to(a_tile.dtype), a_tile, acc=w, out_dtype=tl.float32)
    where = out_ptr + row0 * n_cols + col0 + r[:, None] * n_cols + c[None, :]
    if STORE == 0:
        tl.store(where, w.to(out_ptr.dtype.element_ty))
    else:
        tl.store(where, w.to(out_ptr.dtype.element_ty), cache_modifier=".cs")


@triton.jit
def probe(packed_ptr, code8_ptr, map8_ptr, scale8_ptr, offset_ptr, table_ptr, pair_ptr, b_ptr, a_ptr, out_ptr,
          n_rows, n_cols, scaling, n_row_tiles, n_col_tiles,
          RANK: tl.constexpr, BLOCKSIZE: tl.constexpr, DQ_BLOCKSIZE: tl.constexpr, BM: tl.constexpr,
          BN: tl.constexpr, LOWRANK: tl.constexpr, GATHER: tl.constexpr, DQ: tl.constexpr, ORDER: tl.constexpr,
          INTERP: tl.constexpr = False, TILES: tl.constexpr = 1, STORE: tl.constexpr = 0):
    """TILES consecutive row tiles of one column strip per program (`_tile` each; the loop lets the compiler
    load a tile's codes while the one before is computed), programs ordered by ORDER."""
    pid = tl.program_id(0)
    n_groups = n_row_tiles // TILES
    if ORDER == 0:
        pid_m = pid % n_groups
        pid_n = pid // n_groups
    else:
        pid_n = pid % n_col_tiles
        pid_m = pid // n_col_tiles
    for t in range(TILES):
        row0 = (pid_m.to(tl.int64) * TILES + t) * BM
        _tile(packed_ptr, code8_ptr, map8_ptr, scale8_ptr, offset_ptr, table_ptr, pair_ptr, b_ptr, a_ptr, out_ptr,
              n_cols, scaling, row0, pid_n, RANK, BLOCKSIZE, DQ_BLOCKSIZE, BM, BN, LOWRANK, GATHER, DQ, INTERP, STORE)


def run(q, A, B, out, bm, bn, lowrank, gather, dq, order, nw=4, tiles=1, store=0):
    """A call that launches `probe` on q (NF4+DQ, rank-16 A and B) into out, with the switches given."""
    _, _, map8 = device_tables(q.packed.device)
    table = torch.tensor(NF4_TABLE, dtype=torch.float32, device=q.packed.device)
    absmax, code8, scale8, offset, dqb = _dq_args(q)
    t = torch.tensor(NF4_TABLE, dtype=torch.float32)
    pair = torch.stack([t[torch.arange(256) >> 4], t[torch.arange(256) & 15]], 1).contiguous().view(torch.int64)
    pair = pair.reshape(256).to(q.packed.device)
    n_rows, n_cols = q.shape
    nrt, nct = n_rows // bm, n_cols // bn
    if n_rows % bm or n_cols % bn or nrt % tiles:
        raise ValueError(f"{n_rows}x{n_cols} is no whole number of {tiles} x ({bm}, {bn}) tiles")

    def call():
        probe[(nrt // tiles * nct,)](q.packed, code8, map8, scale8, offset, table, pair, B, A, out, n_rows, n_cols, 2.0,
                            nrt, nct, RANK=16, BLOCKSIZE=64, DQ_BLOCKSIZE=dqb, BM=bm, BN=bn, LOWRANK=lowrank,
                            GATHER=gather, DQ=dq, ORDER=order, num_warps=nw,
                            INTERP=q.packed.device.type == "cpu", TILES=tiles, STORE=store)
        return out
    return call


def main():
    """Run the probe rows on CUDA (on a CPU: tiny shapes, under TRITON_INTERPRET=1) -> sys.argv[1] (JSON)."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "versions": {"torch": torch.__version__, "triton": triton.__version__}, "rows": []}
    for out_f, in_f in ([(14336, 4096), (4096, 4096)] if dev.type == "cuda" else [(64, 256), (32, 256)]):
        torch.manual_seed(0)
        ws = [torch.randn(out_f, in_f, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(3)]
        qs = [kernels.quantize(w, 64, True) for w in ws]
        A = (torch.randn(16, in_f, device=dev) / math.sqrt(in_f)).bfloat16()
        B = (torch.randn(out_f, 16, device=dev) * 0.1).bfloat16()
        outs = [torch.empty(out_f, in_f, device=dev, dtype=torch.bfloat16) for _ in range(3)]
        n = out_f * in_f
        nbytes = n * 2 + n // 2 + n // 64 + 4 * (n // 64 // 256)
        ref = nf4_lora_weight_triton(qs[0], A, B, 2.0, torch.bfloat16)

        def rec(name, fns, check=None):
            s = time_queued(fns, warmup=5, reps=30, device=dev)
            err = None
            if check is not None:
                err = ((check.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            row = {"shape": f"{out_f}x{in_f}", "name": name, "ms": s["median_ms"], "q1": s.get("q1_ms"),
                   "q3": s.get("q3_ms"), "TBps": nbytes / (s["median_ms"] * 1e-3) / 1e12, "err": err}
            res["rows"].append(row)
            print(f"{row['shape']:>11} {name:<44} {row['ms']:.4f} ms {row['TBps']:.2f} TB/s err {err}", flush=True)

        rec("library build (dot bm32 bn128 w4)", [lambda q=q: nf4_lora_weight_triton(q, A, B, 2.0, torch.bfloat16) for q in qs])
        rec("library 1-D dequantize", [lambda q=q: kernels.dequantize(q, torch.bfloat16) for q in qs])
        rec("copy 2.5 B/weight (bf16 copy of 0.625 n)", [lambda w=w: w.view(-1)[: int(n * 0.625)].clone() for w in ws])
        # the rows call W measured (its pair-table tiles are left out) and those it did not: the accumulator
        # form, streaming stores, several row tiles per program, and the last two together
        for name, kw in [("lowrank1", {}), ("lowrank0", dict(lowrank=0)), ("gather2", dict(gather=2)),
                         ("dq0", dict(dq=0)), ("order1", dict(order=1)), ("gather1", dict(gather=1)),
                         ("lowrank2 (accumulator)", dict(lowrank=2)), ("store1 (streaming)", dict(store=1)),
                         ("tiles2", dict(tiles=2)), ("tiles4", dict(tiles=4)),
                         ("tiles2 store1", dict(tiles=2, store=1)),
                         ("lowrank2 tiles2 store1", dict(lowrank=2, tiles=2, store=1))]:
            args = dict(lowrank=1, gather=0, dq=1, order=0) | kw
            name = f"bm32 bn128 {name}"
            try:
                fns = [run(q, A, B, o, 32, 128, **args) for q, o in zip(qs, outs)]
                outs[0].zero_()  # a launch that wrote nothing must not pass on the last row's output
                exact = args["lowrank"] != 0 and args["dq"] == 1 and args["gather"] != 2
                rec(name, fns, fns[0]().clone() if exact else None)
            except Exception as e:
                print(name, "FAILED", e)
        del ws, qs, outs
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    write_json(sys.argv[1], res)


if __name__ == "__main__":
    main()
