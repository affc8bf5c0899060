"""Section nf4: NF4 quantize / dequantize (blocksize 64, with and without double quant) against
bitsandbytes, bit for bit first, then timed over distinct inputs; the Triton kernels at a few block sizes
and warp counts (rows `tuning`); and the one-pass build W' = deq(W) + s·B A against dequantize + addmm
(rows `build`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from bench.common import DTYPE, R, Row, Settings, free, guard, rel_err, timed
from minilora import from_bnb, kernels
from minilora.kernels import double_quantize
from minilora.nf4 import dequantize_nf4, quantize_nf4
from minilora.profiling import time_fn

CPU_NF4_SHAPES = [(256, 256), (96, 320)]  # toy sizes for --device cpu
# nf4 rows cycle through this many distinct inputs (at 4096² bf16: 4 x (33.5 MB in + 8.4 MB out), over 3x the
# H100's 50 MB L2), with this many timed calls (full run, --quick) on a GPU
NF4_BUFFERS = 4
NF4_REPS = (100, 40)


def nf4_bytes(n: int, double_quant: bool, out_bytes: int = 2) -> int:
    """Bytes a dequantization must move: codes + scales in, values out (quantization: the same, reversed)."""
    n_blocks = -(-n // 64)
    scales = n_blocks + 4 * -(-n_blocks // 256) if double_quant else 4 * n_blocks
    return n // 2 + scales + out_bytes * n


def _same_nf4(a: Any, b: Any) -> dict[str, int]:
    """Element counts that differ between two NF4Tensors: packed bytes, code nibbles, scales."""
    diff = {"bytes": int((a.packed != b.packed).sum()),
            "nibbles": int(((a.packed >> 4) != (b.packed >> 4)).sum() + ((a.packed & 15) != (b.packed & 15)).sum())}
    if a.double_quant:
        diff["absmax_codes"] = int((a.absmax.codes != b.absmax.codes).sum())
        diff["absmax_scales"] = int((a.absmax.scales != b.absmax.scales).sum())
        diff["offset"] = int(a.absmax.offset != b.absmax.offset)
    else:
        diff["absmax"] = int((a.absmax != b.absmax).sum())
    return diff


def _nf4_plan(cfg: Settings) -> tuple[int, int]:
    """(distinct input buffers, timed calls) of each nf4 row."""
    if cfg.device.type != "cuda":
        return 2, cfg.reps
    return NF4_BUFFERS, NF4_REPS[1] if cfg.quick else NF4_REPS[0]


@dataclass
class NF4Rows:
    """What the nf4 rows of one shape and one double-quant setting share. The rows run in order; each leaves
    in `state` what later ones compare with (bitsandbytes' bytes and times)."""

    cfg: Settings
    ws: list[Tensor]  # distinct inputs of one shape; ws[0] is the one checked
    dq: bool
    reps: int
    copy_tbps: float | None
    bnbF: Any  # bitsandbytes.functional, or None
    triton_ok: bool
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def w(self) -> Tensor:
        return self.ws[0]

    def bandwidth(self, row: Row) -> None:
        if row.ms:
            tbps = nf4_bytes(self.w.numel(), self.dq) / (row.ms * 1e-3) / 1e12
            row.info["TBps"] = tbps
            if self.copy_tbps:
                row.info["fraction_of_copy"] = tbps / self.copy_tbps

    def ratio_to(self, row: Row, key: str) -> None:
        if self.state.get(key):
            row.ratio = row.ms / self.state[key]


# ---------------------------------------------------------------------------------------------------------
# The rows of one shape, in the order they run


def _bnb_quant(row: Row, c: NF4Rows) -> None:
    bnbF = c.bnbF
    if bnbF is None:
        raise RuntimeError("bitsandbytes is not installed")
    raw = [bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=c.dq) for x in c.ws]
    c.state["bnb_raw_all"] = raw
    c.state["bnb_raw"] = raw[0]
    c.state["bnb_all"] = [from_bnb(packed, qs) for packed, qs in raw]
    c.state["bnb"] = c.state["bnb_all"][0]
    deq = bnbF.dequantize_4bit(*raw[0])
    row.err = rel_err(deq, c.w)  # quantization error ‖W − deq‖/‖W‖ (anchor: 0.0920)
    timed(row, [lambda x=x: bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=c.dq)
                for x in c.ws], c.cfg, c.reps)
    c.bandwidth(row)
    c.state["bnb_quant_ms"] = row.ms


def _ours_quant(row: Row, c: NF4Rows) -> None:
    if not c.triton_ok:
        row.status = "skipped (no Triton on this device)"
        return
    got = kernels.quantize_nf4_triton(c.w, 64, c.dq)
    ref = quantize_nf4(c.w, 64, c.dq)  # minilora.nf4 in PyTorch, same device
    row.info["diff_vs_minilora_nf4"] = d = _same_nf4(got, ref)
    if "bnb" in c.state:
        row.info["diff_vs_bnb"] = _same_nf4(got, c.state["bnb"])
    if any(d.values()):
        row.status = "MISMATCH"
        return
    row.err = 0.0
    timed(row, [lambda x=x: kernels.quantize_nf4_triton(x, 64, c.dq, check_finite=False) for x in c.ws],
          c.cfg, c.reps)
    c.bandwidth(row)
    c.ratio_to(row, "bnb_quant_ms")
    if c.cfg.device.type == "cuda" and not c.dq and "bnb" in c.state:
        _rounding_vs_bnb(row, c)
    if c.dq and "bnb" in c.state:
        row.info["dq_rules_vs_bnb"] = _dq_rules_vs_bnb(got, c.state["bnb"], c.w)


def _rounding_vs_bnb(row: Row, c: NF4Rows) -> None:
    """Which reciprocal does bitsandbytes' CUDA kernel use? Code differences for each rounding."""
    for rounding in ("rcp_approx", "div_full"):
        try:
            alt = kernels.quantize_nf4_triton(c.w, 64, False, rounding=rounding, check_finite=False)
            row.info[f"diff_vs_bnb_{rounding}"] = _same_nf4(alt, c.state["bnb"])
        except Exception as err:  # noqa: BLE001
            row.info[f"diff_vs_bnb_{rounding}"] = repr(err)[:200]


def _dq_rules_vs_bnb(ours: Any, theirs: Any, w: Tensor) -> dict[str, Any]:
    """8-bit scale codes differing from bitsandbytes' for each rounding rule of `blockwise_8bit_triton`, on the
    same 4-bit block scales: "grid" is the CPU rule minilora stores; "search" is the CUDA kernel's search."""
    absmax = kernels.quantize_nf4_triton(w, 64, False, check_finite=False).absmax
    variants = [("grid", "exact"), ("nearest", "exact"), ("search", "exact")]
    if w.device.type == "cuda":
        variants += [("search", "rcp_approx"), ("search", "div_full")]
    out: dict[str, Any] = {"n_codes": int(theirs.absmax.codes.numel())}
    for rule, rounding in variants:
        try:
            got = kernels.double_quantize_triton(absmax, rule=rule, rounding=rounding)
            out[f"{rule} {rounding}"] = int((got.codes != theirs.absmax.codes).sum())
        except Exception as err:  # noqa: BLE001
            out[f"{rule} {rounding}"] = repr(err)[:200]
    return out


def _bnb_dq_stage(row: Row, c: NF4Rows) -> None:
    bnbF = c.bnbF
    if bnbF is None:
        raise RuntimeError("bitsandbytes is not installed")
    absmaxes = [kernels.quantize(x, 64, False).absmax for x in c.ws]

    def run(a: Tensor) -> object:  # what quantize_4bit(compress_statistics=True) does after the 4-bit step
        offset = a.mean()
        return bnbF.quantize_blockwise(a - offset, blocksize=256), offset

    timed(row, [lambda a=a: run(a) for a in absmaxes], c.cfg, c.reps)
    c.state["bnb_dq_ms"] = row.ms


def _dq_stage(row: Row, c: NF4Rows) -> None:
    # the 8-bit stage alone on the n/64 block scales: minilora's mean + one kernel
    absmaxes = [kernels.quantize(x, 64, False).absmax for x in c.ws]
    timed(row, [lambda a=a: double_quantize(a) for a in absmaxes], c.cfg, c.reps)


def _bnb_dequant(row: Row, c: NF4Rows) -> None:
    timed(row, [lambda r=r: c.bnbF.dequantize_4bit(*r) for r in c.state["bnb_raw_all"]], c.cfg, c.reps)
    c.bandwidth(row)
    c.state["bnb_deq_ms"] = row.ms


def _ours_dequant(row: Row, c: NF4Rows) -> None:
    if not c.triton_ok:
        row.status = "skipped (no Triton on this device)"
        return
    # bitsandbytes' own bytes where it ran: then the outputs must be identical to its output too
    qs = c.state["bnb_all"] if "bnb_all" in c.state else [kernels.quantize_nf4_triton(x, 64, c.dq) for x in c.ws]
    q = qs[0]
    out = kernels.dequantize_nf4_triton(q, DTYPE)
    ref_torch = dequantize_nf4(q, DTYPE)
    row.info["bitwise_equal_minilora_nf4"] = ok = bool(torch.equal(out, ref_torch))
    if "bnb_raw" in c.state:
        ref = c.bnbF.dequantize_4bit(*c.state["bnb_raw"])
        row.info["bitwise_equal_bnb"] = bool(torch.equal(out, ref.reshape(out.shape)))
        ok = ok and row.info["bitwise_equal_bnb"]
    if not ok:
        row.status = "MISMATCH"
        row.err = rel_err(out, ref_torch)
        return
    row.err = 0.0
    del out, ref_torch
    timed(row, [lambda q=q: kernels.dequantize_nf4_triton(q, DTYPE) for q in qs], c.cfg, c.reps)
    c.bandwidth(row)
    c.ratio_to(row, "bnb_deq_ms")


def _ours_dequant_launch_cache(row: Row, c: NF4Rows) -> None:
    """The row above with `kernels.nf4.LAUNCH_CACHE` on: from the second call of a shape on, the compiled
    kernel is called directly instead of through Triton's launch. Checked against the PyTorch path first."""
    if not c.triton_ok:
        row.status = "skipped (no Triton on this device)"
        return
    qs = c.state["bnb_all"] if "bnb_all" in c.state else [kernels.quantize_nf4_triton(x, 64, c.dq) for x in c.ws]
    was, kernels.nf4.LAUNCH_CACHE = kernels.nf4.LAUNCH_CACHE, True
    try:
        outs = [kernels.dequantize_nf4_triton(qs[0], DTYPE) for _ in range(2)]  # the second call is a direct one
        if not torch.equal(outs[1], dequantize_nf4(qs[0], DTYPE)):
            row.status, row.err = "MISMATCH", rel_err(outs[1], dequantize_nf4(qs[0], DTYPE))
            return
        row.err = 0.0
        timed(row, [lambda q=q: kernels.dequantize_nf4_triton(q, DTYPE) for q in qs], c.cfg, c.reps)
    finally:
        kernels.nf4.LAUNCH_CACHE = was  # as the process had it (MINILORA_LAUNCH_CACHE)
    c.bandwidth(row)
    c.ratio_to(row, "bnb_deq_ms")


def _torch_dequant(row: Row, c: NF4Rows) -> None:
    qs = c.state["bnb_all"] if "bnb_all" in c.state else [quantize_nf4(x, 64, c.dq) for x in c.ws]
    timed(row, [lambda q=q: dequantize_nf4(q, DTYPE) for q in qs], c.cfg, min(c.reps, 10))
    c.bandwidth(row)
    c.ratio_to(row, "bnb_deq_ms")


def _shape_rows(rows: list[Row], c: NF4Rows, tag: str) -> None:
    """The rows of one shape and one double-quant setting, in order (later rows read what earlier ones left)."""
    bodies: list[tuple[str, Callable[[Row, NF4Rows], None]]] = [
        ("bnb quantize_4bit", _bnb_quant), ("minilora quantize (Triton)", _ours_quant)]
    if c.dq:
        bodies += [("bnb DQ stage (mean + quantize_blockwise)", _bnb_dq_stage),
                   ("minilora double_quantize", _dq_stage)]
    bodies += [("bnb dequantize_4bit", _bnb_dequant), ("minilora dequantize (Triton)", _ours_dequant),
               ("minilora dequantize (Triton), launch cache", _ours_dequant_launch_cache),
               ("minilora dequantize (PyTorch)", _torch_dequant)]
    for name, body in bodies:
        guard(rows, Row("nf4", name, tag), lambda row, body=body: body(row, c), c.cfg.device)
        if name == "minilora double_quantize" and rows[-1].ms:
            c.ratio_to(rows[-1], "bnb_dq_ms")
    c.state.clear()


# ---------------------------------------------------------------------------------------------------------
# Section nf4


def nf4_section(cfg: Settings, copy_tbps: float | None) -> list[Row]:
    try:
        import bitsandbytes.functional as bnbF
    except ImportError:  # bitsandbytes' rows then fail one by one; minilora's still run
        bnbF = None

    rows: list[Row] = []
    dev = cfg.device
    triton_ok = kernels.triton_usable(dev)
    shapes = [(4096, 4096), (8192, 8192), (14336, 4096)] if dev.type == "cuda" else CPU_NF4_SHAPES
    if dev.type == "cuda" and cfg.quick:
        shapes = [(8192, 8192)]
    n_buffers, reps = _nf4_plan(cfg)
    for shape in shapes:
        torch.manual_seed(4)
        ws = [torch.randn(shape, device=dev, dtype=DTYPE) for _ in range(n_buffers)]
        for dq in (False, True):
            tag = f"{shape[0]}x{shape[1]}{' DQ' if dq else ''}"
            _shape_rows(rows, NF4Rows(cfg, ws, dq, reps, copy_tbps, bnbF, triton_ok), tag)
        if triton_ok and shape == ((8192, 8192) if dev.type == "cuda" else shapes[-1]):
            rows += _nf4_tuning(cfg, ws)
        del ws
        free(dev)
    rows += _lora_weight_rows(cfg)
    return rows


def _nf4_tuning(cfg: Settings, ws: list[Tensor]) -> list[Row]:
    """Time the dequantize / quantize kernels at a few block sizes and warp counts (DQ on)."""
    rows: list[Row] = []
    dev = cfg.device
    w = ws[0]
    qs = [kernels.quantize_nf4_triton(x, 64, True) for x in ws]
    q = qs[0]
    ref = dequantize_nf4(q, DTYPE)
    _, reps = _nf4_plan(cfg)
    configs = [(b, nw) for b in (1024, 2048, 4096, 8192) for nw in (4, 8)]
    if dev.type != "cuda" or cfg.quick:
        configs = configs[2:4]
    for block, num_warps in configs:
        def deq(row: Row, block: int = block, num_warps: int = num_warps) -> None:
            out = kernels.dequantize_nf4_triton(q, DTYPE, block=block, num_warps=num_warps)
            if not torch.equal(out, ref):
                row.status = "MISMATCH"
                return
            timed(row, [lambda q=q: kernels.dequantize_nf4_triton(q, DTYPE, block=block, num_warps=num_warps)
                        for q in qs], cfg, reps)

        def quant(row: Row, block: int = block, num_warps: int = num_warps) -> None:
            got = kernels.quantize_nf4_triton(w, 64, True, block=block, num_warps=num_warps)
            if any(_same_nf4(got, q).values()):
                row.status = "MISMATCH"
                return
            timed(row, [lambda x=x: kernels.quantize_nf4_triton(x, 64, True, check_finite=False, block=block,
                                                                num_warps=num_warps) for x in ws], cfg, reps)

        tag = f"{tuple(w.shape)} b{block} w{num_warps}"
        guard(rows, Row("tuning", "dequantize DQ (Triton)", tag), deq, dev)
        guard(rows, Row("tuning", "quantize DQ (Triton)", tag), quant, dev)
    return rows


def _lora_weight_configs(cfg: Settings) -> list[tuple[int, int, int]]:
    """(bm, bn, num_warps) of the one-pass build to time: a grid on a GPU, one configuration otherwise."""
    if cfg.device.type != "cuda" or cfg.quick:
        return [(32, 256, 4)]
    return [(bm, bn, nw) for bm in (16, 32, 64) for bn in (128, 256) for nw in (4, 8)]


def _lora_weight_rows(cfg: Settings) -> list[Row]:
    """W' = deq(W) + s·B A: the one-pass Triton build vs dequantize + addmm, at QLoRA's shapes."""
    rows: list[Row] = []
    dev = cfg.device
    if not kernels.triton_usable(dev):
        return rows
    shapes = [(4096, 4096), (14336, 4096), (4096, 14336)] if dev.type == "cuda" else [(96, 256)]
    if dev.type == "cuda" and cfg.quick:
        shapes = shapes[:1]
    for out_f, in_f in shapes:
        torch.manual_seed(5)
        q = kernels.quantize_nf4_triton(torch.randn(out_f, in_f, device=dev, dtype=DTYPE), 64, True)
        A = torch.randn(R, in_f, device=dev, dtype=DTYPE) / math.sqrt(in_f)
        B = torch.randn(out_f, R, device=dev, dtype=DTYPE) * 0.1
        ref = dequantize_nf4(q, torch.float32) + 2.0 * B.float() @ A.float()
        state: dict[str, float] = {}
        tag = f"{out_f}x{in_f} r{R}"

        def torch_build(row: Row) -> None:
            fn = lambda: kernels.dequantize(q, DTYPE).addmm_(B, A, alpha=2.0)  # noqa: E731
            row.err = rel_err(fn(), ref)
            row.ms = time_fn(fn, warmup=cfg.warmup, reps=cfg.reps, device=dev).median_ms
            state["torch"] = row.ms

        guard(rows, Row("build", "deq + addmm_ (PyTorch)", tag), torch_build, dev)
        for bm, bn, nw in _lora_weight_configs(cfg):
            def triton_build(row: Row, bm: int = bm, bn: int = bn, nw: int = nw) -> None:
                fn = lambda: kernels.nf4_lora_weight_triton(q, A, B, 2.0, DTYPE, bm=bm, bn=bn, num_warps=nw)  # noqa: E731
                row.err = rel_err(fn(), ref)
                if not row.err <= 1e-2:
                    row.status = "MISMATCH"
                    return
                row.ms = time_fn(fn, warmup=cfg.warmup, reps=cfg.reps, device=dev).median_ms
                if state.get("torch"):
                    row.ratio = row.ms / state["torch"]
                row.info["TBps"] = (q.numel // 2 + q.n_blocks + 2 * q.numel) / (row.ms * 1e-3) / 1e12
            guard(rows, Row("build", f"Triton deq+sBA bm{bm} bn{bn} w{nw}", tag), triton_build, dev)
        del q, A, B, ref
        free(dev)
    return rows
