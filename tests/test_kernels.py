"""The Triton kernels of minilora.kernels, run on a CPU by Triton's interpreter, against minilora.nf4 and
bitsandbytes bit for bit, and against float64 math where they round once.

The interpreter must be switched on (TRITON_INTERPRET=1) before triton is imported, and other tests in
this process may import it without: so the interpreted checks run in one subprocess, which prints a JSON
verdict per check, and each test below asserts one of them. References: `minilora.nf4` (itself checked
against bitsandbytes in tests/test_nf4.py), `bitsandbytes.functional` 4-bit (de)quantization on a CPU, and
float64 evaluations of deq(W) + s·B A, of row norms and of column dot products.
"""

from __future__ import annotations

import inspect
import os
import textwrap

import pytest
import torch
from helpers import run_interpreted

from minilora import kernels
from minilora.nf4 import dequantize_nf4, quantize_nf4

CHECKS = ["quantize_matches_minilora", "quantize_matches_bnb", "dequantize_matches", "blockwise_8bit_grid",
          "blockwise_8bit_nearest_and_search", "double_quantize", "lora_weight", "dense_lora_weight",
          "column_dot", "fast_qlora_triton", "bad_input"]


def hard_8bit_values():
    """Hard cases for 8-bit rounding to the dynamic map: (values (n,) float32, how many halfway values)."""
    import torch

    from minilora.double_quant import dynamic_map

    # groups of 256 (each led by 1.0, so its scale is 1): values within 2e-5 of a midpoint between two map
    # entries, values exactly halfway between two grid points whose entries differ, random values, a
    # group of zeros (bnb's CPU kernel writes byte 0 there) and a ragged last group
    code = dynamic_map()
    mids = (code[:-1] + code[1:]) / 2
    one = torch.tensor([1.0])
    near = (mids + (torch.rand(255) - 0.5) * 4e-5).clamp(-1, 1)
    points = torch.arange(65536, dtype=torch.float32) * 2.0 / 65535 - 1.0
    entry = torch.searchsorted(mids, points)
    halfway = []
    for k in (entry[1:] != entry[:-1]).nonzero().flatten().tolist()[:255]:
        t = torch.tensor((k + 0.5) / 65535, dtype=torch.float32)
        for _ in range(20):  # float32 neighbours until t·65535 rounds to exactly k + 0.5
            if (t * 65535).item() == k + 0.5:
                halfway.append((2 * t - 1).item())
                break
            t = torch.nextafter(t, torch.tensor(1.0 if (t * 65535).item() < k + 0.5 else -1.0))
    found = len(halfway)
    halfway = torch.tensor(halfway + [0.0] * (255 - found))
    groups = [one, near, one, halfway, one, torch.rand(255) * 2 - 1, torch.zeros(256),
              torch.randn(300) * 1e-3]
    return torch.cat(groups), found


# the interpreted checks run this helper's source too (the subprocess cannot import the test module)
SCRIPT = textwrap.dedent(inspect.getsource(hard_8bit_values)) + textwrap.dedent(
    r'''
    import json, math, os, sys
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    import triton  # noqa: F401  (imported after the variable is set: interpreted)
    from minilora import fast, kernels
    from minilora.nf4 import NF4Tensor, NF4_TABLE, dequantize_nf4, quantize_nf4
    from minilora.bnb import from_bnb

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
            msg = same(kernels.quantize_nf4_triton(w, bs, dq, block=4096), quantize_nf4(w, bs, dq))
            if msg:
                return f"{shape} bs{bs} dq{dq} {dtype}: {msg}"

    @check("quantize_matches_bnb")
    def _():
        import bitsandbytes.functional as bnbF
        for shape, bs, dq, dtype in CASES[:3]:
            w = weight(shape, dtype)
            packed, state = bnbF.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=dq)
            msg = same(kernels.quantize_nf4_triton(w, bs, dq, block=4096), from_bnb(packed, state))
            if msg:
                return f"{shape} bs{bs} dq{dq} {dtype}: {msg}"

    @check("dequantize_matches")
    def _():
        import bitsandbytes.functional as bnbF

        from minilora.bnb import cpu_dequantize_path
        for shape, bs, dq, dtype in CASES:
            w = weight(shape, dtype)
            packed, state = bnbF.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=dq)
            q = from_bnb(packed, state)
            with cpu_dequantize_path("pytorch"):  # bitsandbytes' flattened-block rule on any CPU
                bnb_out = bnbF.dequantize_4bit(packed, state).reshape(shape)  # in w's dtype
            for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
                got = kernels.dequantize_nf4_triton(q, out_dtype, block=4096)
                if not torch.equal(got, dequantize_nf4(q, out_dtype)):
                    return f"{shape} bs{bs} dq{dq} -> {out_dtype}: differs from minilora.nf4"
                if out_dtype == dtype and not torch.equal(got, bnb_out):
                    return f"{shape} bs{bs} dq{dq} -> {out_dtype}: differs from bitsandbytes"
            out = torch.full(shape, float("nan"), dtype=torch.bfloat16)  # poisoned: every element must be written
            kernels.dequantize_nf4_triton(q, torch.bfloat16, out=out, block=4096)
            if not torch.equal(out, dequantize_nf4(q, torch.bfloat16)):
                return f"{shape}: out= path left or wrote wrong elements"

    @check("blockwise_8bit_grid")
    def _():
        import bitsandbytes.functional as bnbF
        from minilora.double_quant import dynamic_map, quantize_blockwise_8bit
        code = dynamic_map()
        x, n_half = hard_8bit_values()
        if n_half < 100:
            return f"only {n_half} halfway values found: the check would prove little"
        for values in (x, x[:3], torch.randn(1000) * 0.01):
            got, got_scales = kernels.blockwise_8bit_triton(values, 256)
            ref, ref_scales = quantize_blockwise_8bit(values, code)  # PyTorch, bnb's CPU rule
            bnb, state = bnbF.quantize_blockwise(values, code=code, blocksize=256)
            if not (torch.equal(got, ref) and torch.equal(got, bnb)):
                return (f"n={values.numel()}: {int((got != bnb).sum())} codes differ from bnb, "
                        f"{int((got != ref).sum())} from PyTorch")
            if not (torch.equal(got_scales, ref_scales) and torch.equal(got_scales, state.absmax)):
                return f"n={values.numel()}: scales differ"

    @check("blockwise_8bit_nearest_and_search")
    def _():
        from minilora.double_quant import dynamic_map, quantize_blockwise_8bit
        code = dynamic_map()
        x, _ = hard_8bit_values()
        got, _ = kernels.blockwise_8bit_triton(x, 256, rule="nearest")
        ref, _ = quantize_blockwise_8bit(x, code, exact=True)
        if not torch.equal(got, ref):
            return f"nearest: {int((got != ref).sum())} codes differ from quantize_blockwise_8bit(exact=True)"
        # the search of bnb's CUDA kernel finds the nearest entry too (float64 distances; random values hit no
        # exact tie), and sends an all-zero group (0 · inf = NaN) to entry 0
        values = torch.cat([torch.randn(768) * 0.01, torch.zeros(256), torch.tensor([1.0, -1.0, 0.0])])
        got, scales = kernels.blockwise_8bit_triton(values, 256, rule="search")
        scaled = values.double() / scales.double().repeat_interleave(256)[: values.numel()]
        nearest = (scaled.unsqueeze(1) - code.double()).abs().argmin(dim=1)
        zero = torch.zeros(values.numel(), dtype=torch.bool)
        zero[768:1024] = True
        if not torch.equal(got[~zero].long(), nearest[~zero]) or got[zero].any():
            return f"search: {int((got[~zero].long() != nearest[~zero]).sum())} codes are not the nearest entry"

    @check("double_quantize")
    def _():
        import bitsandbytes.functional as bnbF
        from minilora.double_quant import double_quantize
        w = torch.randn(300, 200)  # 938 blocks of 64: 4 groups of 256 scales, the last ragged
        _, plain = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
        _, nested = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        got = kernels.double_quantize_triton(plain.absmax)
        ref = double_quantize(plain.absmax)
        for name, a, b, c in (("codes", got.codes, ref.codes, nested.absmax),
                              ("scales", got.scales, ref.scales, nested.state2.absmax),
                              ("offset", got.offset, ref.offset, nested.offset)):
            if not (torch.equal(a, b) and torch.equal(a, c)):
                return f"{name} differ (PyTorch {torch.equal(a, b)}, bnb {torch.equal(a, c)})"

    @check("lora_weight")
    def _():
        # ragged tiles (masked) and one exact tiling (32 x 256 in 16 x 128 tiles: the unmasked EVEN form);
        # both ways of forming the rank-r term
        for (o, i, r, dq, bs, dt, variant) in [(48, 192, 8, True, 64, torch.bfloat16, "outer"),
                                               (40, 320, 16, False, 64, torch.float16, "dot"),
                                               (33, 128, 3, True, 32, torch.bfloat16, "dot"),
                                               (32, 256, 5, True, 64, torch.bfloat16, "outer"),
                                               (32, 256, 16, True, 64, torch.bfloat16, "dot")]:
            q = quantize_nf4(torch.randn(o, i), bs, dq)
            A = (torch.randn(r, i) / math.sqrt(i)).to(dt)
            B = torch.randn(o, r).to(dt)
            s = 0.7
            kw = dict(bm=16, bn=128, variant=variant)
            exact = dequantize_nf4(q, torch.float32).double() + s * B.double() @ A.double()
            got = kernels.nf4_lora_weight_triton(q, A, B, s, dt, **kw)
            rel = ((got.double() - exact).norm() / exact.norm()).item()
            exact_share = (got == exact.to(dt)).double().mean().item()
            if rel > 3e-3 or exact_share < 0.98:
                return f"({o},{i}) r{r} {variant}: rel err {rel:.2e}, correctly rounded share {exact_share:.3f}"
            c = torch.rand(o) + 0.5
            scaled = kernels.nf4_lora_weight_triton(q, A, B, s, dt, row_scale=c, **kw)
            rel = ((scaled.double() - exact * c.double()[:, None]).norm() / exact.norm()).item()
            if rel > 3e-3:
                return f"({o},{i}) r{r} {variant} row_scale: rel err {rel:.2e}"
            norm = kernels.nf4_lora_row_norm_triton(q, A, B, s, **kw)
            rel = ((norm.double() - exact.norm(dim=1)).abs() / exact.norm(dim=1)).max().item()
            if rel > 1e-5:
                return f"({o},{i}) r{r} {variant} row norm: rel err {rel:.2e}"

    @check("dense_lora_weight")
    def _():
        for (o, i, r, dt, variant) in [(48, 200, 8, torch.bfloat16, "outer"), (33, 96, 3, torch.float16, "dot"),
                                       (32, 128, 16, torch.bfloat16, "dot"), (32, 128, 2, torch.float16, "outer")]:
            w0 = (torch.randn(o, i) * 0.05).to(dt)
            A = (torch.randn(r, i) / math.sqrt(i)).to(dt)
            B = torch.randn(o, r).to(dt)
            s, c = 0.7, torch.rand(o) + 0.5
            kw = dict(bm=16, bn=64, variant=variant)
            exact = w0.double() + s * B.double() @ A.double()
            got = kernels.dense_lora_weight_triton(w0, A, B, s, **kw)
            rel = ((got.double() - exact).norm() / exact.norm()).item()
            exact_share = (got == exact.to(dt)).double().mean().item()
            if rel > 3e-3 or exact_share < 0.98:
                return f"({o},{i}) r{r} {variant}: rel err {rel:.2e}, correctly rounded share {exact_share:.3f}"
            scaled = kernels.dense_lora_weight_triton(w0, A, B, s, row_scale=c, **kw)
            rel = ((scaled.double() - exact * c.double()[:, None]).norm() / exact.norm()).item()
            if rel > 3e-3:
                return f"({o},{i}) r{r} {variant} row_scale: rel err {rel:.2e}"
            norm = kernels.dense_lora_row_norm_triton(w0, A, B, s, **kw)
            rel = ((norm.double() - exact.norm(dim=1)).abs() / exact.norm(dim=1)).max().item()
            if rel > 1e-5:
                return f"({o},{i}) r{r} {variant} row norm: rel err {rel:.2e}"

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
            kernels.quantize_nf4_triton(w, 64)
            return "NaN weight was accepted"
        except ValueError:
            pass
        try:
            kernels.quantize_nf4_triton(torch.randn(4, 64), 64, block=96)
            return "block 96 was accepted"
        except ValueError:
            pass
        for kwargs in ({"rule": "closest"}, {"rule": "search", "rounding": "rcp_approx"}, {"rounding": "div_full"}):
            try:
                kernels.blockwise_8bit_triton(torch.randn(300), 256, **kwargs)
                return f"blockwise_8bit_triton accepted {kwargs} on a CPU"
            except ValueError:
                pass
        for bad in (torch.randn(300).double(), torch.randn(3, 100)):
            try:
                kernels.blockwise_8bit_triton(bad, 256)
                return f"blockwise_8bit_triton accepted {bad.dtype} {tuple(bad.shape)}"
            except ValueError:
                pass

    print("RESULTS " + json.dumps(results))
    '''
)


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_interpreted(SCRIPT)


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


def test_lora_weight_config_rejects_bad_knobs() -> None:
    from minilora.kernels import lora_weight as K

    for kind in ("dense", "nf4"):
        cfg = kernels.LORA_WEIGHT_CONFIG[kind]
        assert set(cfg) == {"bm", "bn", "num_warps", "variant"} and cfg["variant"] in K.LORA_WEIGHT_VARIANTS
    with pytest.raises(ValueError, match="variant"):
        K._tile_config("dense", None, None, None, "wmma")
    with pytest.raises(ValueError, match="powers of two"):
        K._tile_config("nf4", 24, None, None, None)
    with pytest.raises(ValueError, match="num_warps"):
        K._tile_config("nf4", None, None, 3, None)


def test_specialization_key_tells_apart_what_triton_compiles_anew_for() -> None:
    from minilora.kernels.nf4 import specialization_key

    x = torch.zeros(64, dtype=torch.uint8)
    base = specialization_key((x, 64, 2.0))
    assert specialization_key((x.clone(), 128, 3.5)) == base  # same dtype, aligned; 16 | n; a float
    for other in [(x[1:], 64, 2.0), (x.float(), 64, 2.0), (x, 65, 2.0), (x, 1, 2.0), (x, 2**31 + 16, 2.0),
                  (x, 2**63 + 16, 2.0), (x, 64, 2), (x, True, 2.0)]:
        assert specialization_key(other) != base, other
    assert specialization_key((x, None)) is None  # unknown kinds of argument: Triton's own launch


def test_launch_calls_the_compiled_kernel_directly_from_the_second_call(monkeypatch) -> None:
    """`kernels.nf4.launch` with a stand-in kernel, the launch cache on: the first call of a key through Triton,
    later calls straight to the compiled kernel it returned, every parameter in order, the grid made 3-D."""
    from minilora.kernels import nf4 as K

    calls = []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *params: calls.append(("direct", grid, params))

    class Kernel:
        arg_names = ["x_ptr", "n", "BLOCK", "FLAG"]

        def __getitem__(self, grid):
            def run(*args, **meta):
                calls.append(("triton", grid, args, meta))
                return Compiled()
            return run

    monkeypatch.setattr(K, "interpreted", lambda: False)
    monkeypatch.setattr(K, "LAUNCH_CACHE", True)
    monkeypatch.setattr(K, "_LAUNCHES", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    kernel, x = Kernel(), torch.zeros(64)
    K.launch(kernel, (4,), x, 64, BLOCK=16, FLAG=True, num_warps=4)
    K.launch(kernel, (5,), x, 32, BLOCK=16, FLAG=True, num_warps=4)
    K.launch(kernel, (5,), x, 1, BLOCK=16, FLAG=True, num_warps=4)  # n = 1 is compiled in: a new key
    K.launch(kernel, (5,), x, 64, BLOCK=32, FLAG=True, num_warps=4)  # another constexpr: a new key
    assert calls == [("triton", (4,), (x, 64), {"BLOCK": 16, "FLAG": True, "num_warps": 4}),
                     ("direct", (5, 1, 1), (x, 32, 16, True)),
                     ("triton", (5,), (x, 1), {"BLOCK": 16, "FLAG": True, "num_warps": 4}),
                     ("triton", (5,), (x, 64), {"BLOCK": 32, "FLAG": True, "num_warps": 4})]
    with pytest.raises(TypeError, match="FLAG"):
        K.launch(kernel, (4,), x, 48, BLOCK=16, num_warps=4)
    assert len(calls) == 4
    monkeypatch.setattr(K, "LAUNCH_CACHE", False)  # off (the default): Triton's launch every time
    K.launch(kernel, (5,), x, 32, BLOCK=16, FLAG=True, num_warps=4)
    assert calls[-1][0] == "triton" and len(calls) == 5


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


@pytest.mark.cuda
def test_cuda_double_quantize_is_bitsandbytes_cpu_rule():
    # on CUDA kernels.double_quantize runs the Triton kernel (compiled: no fused multiply-adds may creep in);
    # its bytes must be those of bitsandbytes' CPU kernel on the same centred values, and of the PyTorch path
    bnbF = pytest.importorskip("bitsandbytes.functional")
    from minilora.double_quant import double_quantize, dynamic_map

    torch.manual_seed(5)
    absmax = kernels.quantize_nf4_triton(torch.randn(2048, 4096, device="cuda"), 64).absmax
    dq = kernels.double_quantize(absmax)
    reference = double_quantize(absmax)
    assert all(torch.equal(getattr(dq, f), getattr(reference, f)) for f in ("codes", "scales", "offset"))
    hard, _ = hard_8bit_values()
    for values, got, got_scales in (((absmax - dq.offset).cpu(), dq.codes, dq.scales),
                                    (hard, *kernels.blockwise_8bit_triton(hard.cuda(), 256))):
        theirs, state = bnbF.quantize_blockwise(values, code=dynamic_map(), blocksize=256)
        assert torch.equal(got.cpu(), theirs), f"{int((got.cpu() != theirs).sum())} of {values.numel()} codes differ"
        assert torch.equal(got_scales.cpu(), state.absmax)


@pytest.mark.cuda
def test_cuda_search_rule_reproduces_bitsandbytes_cuda():
    # bitsandbytes' CUDA kernel binary-searches the map instead of using the CPU grid. rule="search" is that
    # search; with one of the three reciprocals the codes are expected to be identical to its own
    bnbF = pytest.importorskip("bitsandbytes.functional")
    from minilora.double_quant import dynamic_map

    torch.manual_seed(6)
    absmax = kernels.quantize_nf4_triton(torch.randn(4096, 4096, device="cuda"), 64).absmax
    hard, _ = hard_8bit_values()
    values = torch.cat([absmax - absmax.mean(), hard.cuda()])
    theirs, state = bnbF.quantize_blockwise(values, code=dynamic_map(device="cuda"), blocksize=256)
    diffs = {}
    for rounding in ("exact", "rcp_approx", "div_full"):
        got, scales = kernels.blockwise_8bit_triton(values, 256, rule="search", rounding=rounding)
        assert torch.equal(scales, state.absmax)
        diffs[rounding] = int((got != theirs).sum())
    grid, _ = kernels.blockwise_8bit_triton(values, 256)
    diffs["grid (CPU rule)"] = int((grid != theirs).sum())
    assert min(diffs[r] for r in ("exact", "rcp_approx", "div_full")) == 0, f"codes differing from bnb CUDA: {diffs}"


@pytest.mark.cuda
def test_cuda_repeated_launches_compute_what_the_first_did(monkeypatch):
    """With the launch cache on, from its second call of a specialization on, `kernels.nf4.launch` calls the
    compiled kernel directly: every kernel, called again on new data of the same shape, still computes its
    reference."""
    monkeypatch.setattr(kernels.nf4, "LAUNCH_CACHE", True)
    torch.manual_seed(7)
    for _ in range(3):
        w = torch.randn(512, 256, device="cuda")
        q = kernels.quantize_nf4_triton(w, 64, True)
        ref = quantize_nf4(w, 64, True)
        assert torch.equal(q.packed, ref.packed) and torch.equal(q.absmax.codes, ref.absmax.codes)
        assert torch.equal(kernels.dequantize_nf4_triton(q, torch.bfloat16), dequantize_nf4(q, torch.bfloat16))
        A = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16) / 16
        B = torch.randn(512, 16, device="cuda", dtype=torch.bfloat16) / 10
        exact = dequantize_nf4(q, torch.float32).double() + 2.0 * B.double() @ A.double()
        got = kernels.nf4_lora_weight_triton(q, A, B, 2.0, torch.bfloat16)
        assert float((got.double() - exact).norm() / exact.norm()) < 3e-3
        g, y = torch.randn(2, 300, 70, device="cuda", dtype=torch.bfloat16)
        dot, _ = kernels.column_dot(g, y)
        torch.testing.assert_close(dot.double(), (g.double() * y.double()).sum(0), rtol=1e-4, atol=1e-3)
