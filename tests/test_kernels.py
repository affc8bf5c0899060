"""The Triton kernels of minilora.kernels, run on a CPU by Triton's interpreter, against minilora.nf4 and
bitsandbytes bit for bit, and against float64 math where they round once.

The interpreter must be switched on (TRITON_INTERPRET=1) before triton is imported, and other tests in
this process may import it without: so the interpreted checks run in one subprocess, which prints a JSON
verdict per check, and each test below asserts one of them. References: `minilora.nf4` (itself checked
against bitsandbytes in tests/test_nf4.py), `bitsandbytes.functional` 4-bit (de)quantization on a CPU, and
float64 evaluations of deq(W) + s·B A, of row norms and of column dot products.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from minilora import kernels
from minilora.nf4 import dequantize_nf4, quantize_nf4

CHECKS = ["quantize_matches_minilora", "quantize_matches_bnb", "dequantize_matches", "lora_weight", "dense_lora_weight",
          "column_dot", "fast_qlora_triton", "bad_input"]

SCRIPT = textwrap.dedent(
    r'''
    import json, math, os, sys
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    import triton  # noqa: F401  (imported after the variable is set: interpreted)
    from minilora import fast, kernels
    from minilora.kernels import nf4_triton as K
    from minilora.nf4 import NF4Tensor, NF4_TABLE, dequantize_nf4, quantize_nf4
    from minilora.double_quant import from_bnb

    torch.manual_seed(0)
    results = {}

    def check(name):
        def wrap(fn):
            try:
                detail = fn()
                results[name] = {"ok": not detail, "detail": detail or ""}
            except Exception as err:
                results[name] = {"ok": False, "detail": f"{type(err).__name__}: {err}"}
            return fn
        return wrap

    def same(a, b):
        if not torch.equal(a.packed, b.packed):
            return "packed codes differ"
        if a.double_quant != b.double_quant:
            return "double_quant differs"
        if a.double_quant:
            for f in ("codes", "scales", "offset"):
                if not torch.equal(getattr(a.absmax, f), getattr(b.absmax, f)):
                    return f"absmax {f} differ"
        elif not torch.equal(a.absmax, b.absmax):
            return "absmax differs"
        return ""

    def weight(shape, dtype):
        w = torch.randn(shape) * 0.05
        flat = w.view(-1)
        flat[:64] = 0.0  # an all-zero block: codes 7, absmax 0
        if flat.numel() >= 192:  # a value exactly on a midpoint: bnb gives the lower code
            table = torch.tensor(NF4_TABLE)
            flat[128:192] = 0.01
            flat[128] = 1.0
            flat[129] = ((table[8] + table[9]) / 2).item()
            flat[130] = ((table[6] + table[7]) / 2).item()
        return w.to(dtype)

    CASES = [((7, 63), 64, False, torch.float32), ((33, 65), 32, True, torch.float16),
             ((130, 256), 64, True, torch.bfloat16), ((3, 4096), 4096, False, torch.float32),
             ((1001,), 128, False, torch.bfloat16)]

    @check("quantize_matches_minilora")
    def _():
        for shape, bs, dq, dtype in CASES:
            w = weight(shape, dtype)
            msg = same(K.quantize_nf4_triton(w, bs, dq, block=4096), quantize_nf4(w, bs, dq))
            if msg:
                return f"{shape} bs{bs} dq{dq} {dtype}: {msg}"

    @check("quantize_matches_bnb")
    def _():
        import bitsandbytes.functional as bnbF
        for shape, bs, dq, dtype in CASES[:3]:
            w = weight(shape, dtype)
            packed, state = bnbF.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=dq)
            msg = same(K.quantize_nf4_triton(w, bs, dq, block=4096), from_bnb(packed, state))
            if msg:
                return f"{shape} bs{bs} dq{dq} {dtype}: {msg}"

    @check("dequantize_matches")
    def _():
        import bitsandbytes.functional as bnbF
        for shape, bs, dq, dtype in CASES:
            w = weight(shape, dtype)
            packed, state = bnbF.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=dq)
            q = from_bnb(packed, state)
            bnb_out = bnbF.dequantize_4bit(packed, state).reshape(shape)  # in w's dtype
            for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
                got = K.dequantize_nf4_triton(q, out_dtype, block=4096)
                if not torch.equal(got, dequantize_nf4(q, out_dtype)):
                    return f"{shape} bs{bs} dq{dq} -> {out_dtype}: differs from minilora.nf4"
                if out_dtype == dtype and not torch.equal(got, bnb_out):
                    return f"{shape} bs{bs} dq{dq} -> {out_dtype}: differs from bitsandbytes"
            out = torch.full(shape, float("nan"), dtype=torch.bfloat16)  # poisoned: every element must be written
            K.dequantize_nf4_triton(q, torch.bfloat16, out=out, block=4096)
            if not torch.equal(out, dequantize_nf4(q, torch.bfloat16)):
                return f"{shape}: out= path left or wrote wrong elements"

    @check("lora_weight")
    def _():
        for (o, i, r, dq, bs, dt) in [(48, 192, 8, True, 64, torch.bfloat16), (40, 320, 16, False, 64, torch.float16),
                                      (33, 128, 3, True, 32, torch.bfloat16)]:
            q = quantize_nf4(torch.randn(o, i), bs, dq)
            A = (torch.randn(r, i) / math.sqrt(i)).to(dt)
            B = torch.randn(o, r).to(dt)
            s = 0.7
            exact = dequantize_nf4(q, torch.float32).double() + s * B.double() @ A.double()
            got = K.nf4_lora_weight_triton(q, A, B, s, dt, bm=16, bn=128)
            rel = ((got.double() - exact).norm() / exact.norm()).item()
            exact_share = (got == exact.to(dt)).double().mean().item()
            if rel > 3e-3 or exact_share < 0.98:
                return f"({o},{i}) r{r}: rel err {rel:.2e}, correctly rounded share {exact_share:.3f}"
            c = torch.rand(o) + 0.5
            scaled = K.nf4_lora_weight_triton(q, A, B, s, dt, row_scale=c, bm=16, bn=128)
            rel = ((scaled.double() - exact * c.double()[:, None]).norm() / exact.norm()).item()
            if rel > 3e-3:
                return f"({o},{i}) r{r} row_scale: rel err {rel:.2e}"
            norm = K.nf4_lora_row_norm_triton(q, A, B, s, bm=16, bn=128)
            rel = ((norm.double() - exact.norm(dim=1)).abs() / exact.norm(dim=1)).max().item()
            if rel > 1e-5:
                return f"({o},{i}) r{r} row norm: rel err {rel:.2e}"

    @check("dense_lora_weight")
    def _():
        for (o, i, r, dt) in [(48, 200, 8, torch.bfloat16), (33, 96, 3, torch.float16)]:
            w0 = (torch.randn(o, i) * 0.05).to(dt)
            A = (torch.randn(r, i) / math.sqrt(i)).to(dt)
            B = torch.randn(o, r).to(dt)
            s, c = 0.7, torch.rand(o) + 0.5
            exact = w0.double() + s * B.double() @ A.double()
            got = K.dense_lora_weight_triton(w0, A, B, s, bm=16, bn=64)
            rel = ((got.double() - exact).norm() / exact.norm()).item()
            exact_share = (got == exact.to(dt)).double().mean().item()
            if rel > 3e-3 or exact_share < 0.98:
                return f"({o},{i}) r{r}: rel err {rel:.2e}, correctly rounded share {exact_share:.3f}"
            scaled = K.dense_lora_weight_triton(w0, A, B, s, row_scale=c, bm=16, bn=64)
            rel = ((scaled.double() - exact * c.double()[:, None]).norm() / exact.norm()).item()
            if rel > 3e-3:
                return f"({o},{i}) r{r} row_scale: rel err {rel:.2e}"
            norm = K.dense_lora_row_norm_triton(w0, A, B, s, bm=16, bn=64)
            rel = ((norm.double() - exact.norm(dim=1)).abs() / exact.norm(dim=1)).max().item()
            if rel > 1e-5:
                return f"({o},{i}) r{r} row norm: rel err {rel:.2e}"

    @check("column_dot")
    def _():
        for n, c, dt in [(70, 200, torch.bfloat16), (5, 33, torch.float16)]:
            g, y = torch.randn(n, c).to(dt), torch.randn(n, c).to(dt)
            dot, total = kernels.column_dot_triton(g, y, with_sum=True)
            ref_dot = (g.double() * y.double()).sum(0)
            ref_sum = g.double().sum(0)
            err = max((dot.double() - ref_dot).abs().max().item(), (total.double() - ref_sum).abs().max().item())
            if err > 1e-4:
                return f"({n},{c}) {dt}: max abs err {err:.2e}"

    @check("fast_qlora_triton")
    def _():
        # route minilora.fast through the kernels as on a GPU, and compare with float64 math
        kernels._on_gpu = lambda device: True
        fast._triton_build = lambda w, dtype, r: (isinstance(w, NF4Tensor) and dtype in (torch.bfloat16, torch.float16)
                                                  and kernels.nf4_lora_weight_supported(w, r))
        o, i, r, n = 40, 128, 4, 9
        q = quantize_nf4(torch.randn(o, i) * 0.1, 64, True)
        w64 = dequantize_nf4(q, torch.float32).double()
        x = torch.randn(n, i, dtype=torch.bfloat16, requires_grad=True)
        A = (torch.randn(r, i) / math.sqrt(i)).requires_grad_(True)
        B = (torch.randn(o, r) * 0.1).requires_grad_(True)
        m = (w64.norm(dim=1).float() * (1 + 0.1 * torch.randn(o))).requires_grad_(True)
        g = torch.randn(n, o, dtype=torch.bfloat16)
        s = 2.0
        for kind in ("lora", "dora"):
            params = [x, A, B] + ([m] if kind == "dora" else [])
            if kind == "lora":
                y = fast.qlora_linear(x, q, None, A, B, s, path="merged")
            else:
                y = fast.qdora_linear(x, q, None, A, B, m, s)
            got = [y, *torch.autograd.grad(y, params, g)]
            ref_in = [p.detach().double().requires_grad_(True) for p in params]
            x6, A6, B6 = ref_in[:3]
            v = w64 + s * B6 @ A6
            if kind == "lora":
                y6 = x6 @ v.T
            else:
                norm = v.norm(dim=1).detach()
                y6 = x6 @ ((ref_in[3] / norm)[:, None] * v).T
            ref = [y6, *torch.autograd.grad(y6, ref_in, g.double())]
            for name, a, b in zip(["y", "dx", "dA", "dB", "dm"], got, ref):
                rel = ((a.double() - b).norm() / b.norm()).item()
                if not rel < 2e-2:
                    return f"{kind} {name}: rel err {rel:.2e}"

    @check("bad_input")
    def _():
        w = torch.randn(4, 64)
        w[1, 3] = float("nan")
        try:
            K.quantize_nf4_triton(w, 64)
            return "NaN weight was accepted"
        except ValueError:
            pass
        try:
            K.quantize_nf4_triton(torch.randn(4, 64), 64, block=96)
            return "block 96 was accepted"
        except ValueError:
            pass

    print("RESULTS " + json.dumps(results))
    '''
)


@pytest.fixture(scope="module")
def interpreted() -> dict:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreted checks crashed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("name", CHECKS)
def test_interpreted(interpreted: dict, name: str) -> None:
    result = interpreted[name]
    assert result["ok"], result["detail"]


# ---------------------------------------------------------------------------------------------------------
# Without the interpreter: dispatch and argument checks (no kernel runs here)


def test_dispatch_falls_back_to_pytorch_on_cpu() -> None:
    torch.manual_seed(1)
    w = torch.randn(16, 64)
    q = kernels.quantize(w, 64, True)
    ref = quantize_nf4(w, 64, True)
    assert torch.equal(q.packed, ref.packed) and torch.equal(q.absmax.codes, ref.absmax.codes)
    assert torch.equal(kernels.dequantize(q, torch.bfloat16), dequantize_nf4(ref, torch.bfloat16))


def test_column_dot_fallback_matches_float64() -> None:
    torch.manual_seed(2)
    g, y = torch.randn(7, 5), torch.randn(7, 5)
    dot, total = kernels.column_dot(g, y, with_sum=True)
    torch.testing.assert_close(dot.double(), (g.double() * y.double()).sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(total.double(), g.double().sum(0), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="2-D of one shape"):
        kernels.column_dot(g, y[:3])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1" or not kernels.HAVE_TRITON,
                    reason="needs triton, without the interpreter in this process")
def test_kernels_refuse_cpu_tensors_clearly() -> None:
    assert not kernels.triton_usable("cpu")
    q = quantize_nf4(torch.randn(4, 64), 64)
    with pytest.raises(RuntimeError, match="CUDA"):
        kernels.dequantize_nf4_triton(q)
    with pytest.raises(RuntimeError, match="CUDA"):
        kernels.quantize_nf4_triton(torch.randn(4, 64))


def test_quantize_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="blocksize"):
        kernels.quantize_nf4_triton(torch.randn(4, 64), 48)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        kernels.quantize_nf4_triton(torch.randn(4, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="rounding"):
        kernels.quantize_nf4_triton(torch.randn(4, 64), rounding="nearest")
    with pytest.raises(TypeError, match="NF4Tensor"):
        kernels.dequantize_nf4_triton(torch.zeros(4, dtype=torch.uint8))


def test_lora_weight_support_rule() -> None:
    q = quantize_nf4(torch.randn(8, 128), 64)
    assert kernels.nf4_lora_weight_supported(q, 16)
    assert not kernels.nf4_lora_weight_supported(q, 65)  # larger ranks: dequantize + addmm
    assert not kernels.nf4_lora_weight_supported(quantize_nf4(torch.randn(8, 96), 64), 16)  # rows straddle blocks


# ---------------------------------------------------------------------------------------------------------
# On a GPU: the compiled kernels (not the interpreter) against the same references


@pytest.mark.cuda
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernels_bit_exact(double_quant, dtype):
    torch.manual_seed(3)
    for shape in [(4096, 4096), (33, 65), (1001,)]:
        w = torch.randn(shape, device="cuda").to(dtype)
        w.view(-1)[:64] = 0
        got = kernels.quantize_nf4_triton(w, 64, double_quant)
        ref = quantize_nf4(w, 64, double_quant)
        assert torch.equal(got.packed, ref.packed)
        if double_quant:
            assert torch.equal(got.absmax.codes, ref.absmax.codes) and torch.equal(got.absmax.scales, ref.absmax.scales)
        else:
            assert torch.equal(got.absmax, ref.absmax)
        for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert torch.equal(kernels.dequantize_nf4_triton(ref, out_dtype), dequantize_nf4(ref, out_dtype))


@pytest.mark.cuda
def test_cuda_lora_weight_and_column_dot():
    torch.manual_seed(4)
    q = kernels.quantize_nf4_triton(torch.randn(1000, 512, device="cuda"), 64, True)
    A = torch.randn(16, 512, device="cuda", dtype=torch.bfloat16) / 23
    B = torch.randn(1000, 16, device="cuda", dtype=torch.bfloat16) / 10
    exact = dequantize_nf4(q, torch.float32).double() + 2.0 * B.double() @ A.double()
    got = kernels.nf4_lora_weight_triton(q, A, B, 2.0, torch.bfloat16)
    assert float((got.double() - exact).norm() / exact.norm()) < 3e-3
    norm = kernels.nf4_lora_row_norm_triton(q, A, B, 2.0)
    assert float(((norm.double() - exact.norm(dim=1)).abs() / exact.norm(dim=1)).max()) < 1e-5
    g, y = torch.randn(3000, 700, device="cuda", dtype=torch.bfloat16), torch.randn(3000, 700, device="cuda",
                                                                                    dtype=torch.bfloat16)
    dot, total = kernels.column_dot(g, y, with_sum=True)
    torch.testing.assert_close(dot.double(), (g.double() * y.double()).sum(0), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(total.double(), g.double().sum(0), rtol=1e-4, atol=1e-3)
