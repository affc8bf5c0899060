"""The benchmark (`python -m bench`) on a CPU: its checks catch a wrong layer, its summaries pick the right
constants, its output reads back; and one smoke run of every CPU section end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from bench import layers, nf4
from bench.__main__ import main
from bench.common import R, TOL, Row, Settings, summary_table, write_json
from bench.layers import (LayerCase, check_case, count_ops, crossover, crossover_text, fused_fn, minilora_layer,
                          minilora_params, run_layer_row, suggested_crossovers)
from bench.sweep import build_summary, build_summary_text, config_tag


def test_bench_check_and_time_a_fused_row():
    torch.manual_seed(31)
    width, tokens = 128, 20
    base = nn.Linear(width, width, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    A = torch.randn(R, width) / math.sqrt(width)
    B = torch.randn(width, R) * 0.1
    layer = minilora_layer(base, False, A, B, None)
    case = LayerCase(fused_fn(layer), minilora_params(layer), "lora", False, layer)
    x = torch.randn(tokens, width, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(tokens, width, dtype=torch.bfloat16)
    errs = check_case(case, x, g, base.weight.float(), A, B, None)
    assert set(errs) == {"y", "dx", "dA", "dB"} and max(errs.values()) < TOL
    # a wrong layer is caught: the reference check is not vacuous
    wrong = LayerCase(lambda t: case.fn(t) * 1.05, case.params, "lora", False, layer)
    assert check_case(wrong, x, g, base.weight.float(), A, B, None)["y"] > TOL
    rows: list[Row] = []
    cfg = Settings(torch.device("cpu"), True, warmup=0, reps=1)
    run_layer_row(rows, cfg, "minilora fused LoRA", lambda: case, tokens, width, x, g, A, B,
                  {"w32": base.weight.float()}, {(tokens, width): 1.0})
    assert rows[0].status == "ok" and rows[0].ms > 0 and rows[0].ratio == rows[0].ms


def test_bench_crossover_table_and_json(tmp_path):
    rows = [Row("paths", f"fused LoRA, {p}", f"N={n} 4096x4096", ms=ms)
            for n, p, ms in [(16, "merged", 0.2), (16, "unmerged", 0.1), (1024, "merged", 0.30),
                             (1024, "unmerged", 0.31), (8192, "merged", 1.0), (8192, "unmerged", 1.2)]]
    rows += [Row("paths", f"fused QLoRA, {p}", f"N={n} 4096x4096", ms=ms)
             for n, p, ms in [(16, "merged", 0.3), (16, "unmerged", 0.1), (8192, "merged", 1.3), (8192, "unmerged", 1.2)]]
    out = crossover(rows)
    assert out["LoRA 4096"]["crossover_tokens"] == 1024
    assert out["LoRA 4096"]["suggested_MERGE_CROSSOVER"] == pytest.approx(0.25)
    assert out["QLoRA 4096"]["crossover_tokens"] is None and out["QLoRA 4096"]["beyond"] == pytest.approx(2.0)
    # never crossed: the suggestion goes past the range measured (2 x 8192/4096)
    assert suggested_crossovers(out) == {"LoRA": pytest.approx(0.25), "QLoRA": pytest.approx(4.0),
                                         "QLoRA torch build": None}
    assert "SET fast.MERGE_CROSSOVER = 0.25" in crossover_text(out)
    table = summary_table(rows + [Row("layers", "PEFT LoRA", "N=16 4096x4096", status="MISMATCH")])
    assert "PEFT LoRA" in table and "MISMATCH" in table
    assert "fused LoRA, merged" not in table  # sweep rows go to the JSON and the crossover line only
    path = tmp_path / "sub" / "bench.json"
    write_json(str(path), {"rows": [r.__dict__ for r in rows]})
    assert len(json.loads(path.read_text())["rows"]) == 10


def test_bench_build_summary_picks_the_config_and_the_build():
    def row(name, shape, ms, config=None):
        return Row("buildsweep", name, f"{shape} r16", ms=ms, info={"config": config} if config else {})

    fast_cfg = {"variant": "dot", "bm": 32, "bn": 256, "num_warps": 4}
    slow_cfg = {"variant": "outer", "bm": 16, "bn": 128, "num_warps": 8}
    rows = [row("copy bf16 W0", "4096x4096", 0.02), row("copy bf16 W0", "8192x8192", 0.08)]
    for shape, scale in (("4096x4096", 1.0), ("8192x8192", 4.0)):
        rows += [row("dense torch build", shape, 0.1 * scale),
                 row(f"dense Triton {config_tag(fast_cfg)}", shape, 0.025 * scale, fast_cfg),
                 row(f"dense Triton {config_tag(slow_cfg)}", shape, 0.05 * scale, slow_cfg),
                 row("NF4+DQ torch build", shape, 0.1 * scale),
                 row(f"NF4+DQ Triton {config_tag(slow_cfg)}", shape, 0.2 * scale, slow_cfg)]
    rows.append(Row("buildsweep", f"dense Triton {config_tag(slow_cfg)}", "1x1 r16", status="MISMATCH",
                    info={"config": slow_cfg}))
    summary = build_summary(rows)
    assert summary["kinds"]["dense"]["config"] == fast_cfg and summary["kinds"]["dense"]["use_triton"] is True
    assert summary["kinds"]["dense"]["triton_over_torch"] == pytest.approx(0.25)
    assert summary["kinds"]["nf4"]["config"] == slow_cfg and summary["kinds"]["nf4"]["use_triton"] is False
    best = {(e["kind"], e["shape"]): e for e in summary["shapes"]}
    assert best[("dense", "8192x8192 r16")]["best_ms"] == pytest.approx(0.1)
    assert best[("dense", "8192x8192 r16")]["copy_ms"] == pytest.approx(0.08)
    text = build_summary_text(summary)
    assert "SET LORA_WEIGHT_CONFIG['dense'] = " + str(fast_cfg) in text and "SET fast.TRITON_BUILD['nf4'] = False" in text


def test_host_rows_that_take_the_fused_layer_apart_compute_it():
    """The host section's module-call row and its bare autograd.Function of the same operations compute the
    LoRA layer (the float32 check of the layer section), with no more operations than the fused function."""
    torch.manual_seed(32)
    width, tokens = 64, 16
    A, B = layers.adapter_weights(width, torch.device("cpu"))
    builders, shared = layers.layer_cases(width, torch.device("cpu"), A, B, torch.ones(width), seed=2)
    x = torch.randn(tokens, width, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(tokens, width, dtype=torch.bfloat16)
    ops = {}
    for name in ("module", "same_ops"):
        case = shared["host_builders"][name]()
        assert max(check_case(case, x, g, shared["w32"], A, B, None).values()) < TOL, name
        ops[name] = count_ops(lambda: torch.autograd.grad(case.fn(x), [x, *case.params], g))
    fused = builders["minilora fused LoRA"]()
    assert ops["same_ops"] == count_ops(lambda: torch.autograd.grad(fused.fn(x), [x, *fused.params], g))


def test_bench_count_ops():
    x = torch.randn(3, 4, requires_grad=True)
    # forward: mul (the scalar product) and sum; backward adds the autograd engine's own ops
    assert count_ops(lambda: (x * 2).sum()) == 2
    assert count_ops(lambda: torch.autograd.grad((x * 2).sum(), [x])) > 2


@pytest.mark.slow
def test_bench_cpu_smoke(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(layers, "CPU_LAYER_PLAN", [(128, [4, 130])])
    monkeypatch.setattr(nf4, "CPU_NF4_SHAPES", [(64, 128)])
    monkeypatch.setattr(layers, "HOST_SHAPE", (4, 64))
    assert main(["--device", "cpu", "--quick", "--sections", "layers,nf4,host,train", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    bad = [(r["name"], r["config"], r["status"], r["info"].get("error")) for r in data["rows"]
           if r["status"] != "ok" and not r["status"].startswith("skipped")]
    assert not bad
    assert {r["section"] for r in data["rows"]} >= {"layers", "paths", "nf4", "host", "train"}
    timed_nf4 = [r for r in data["rows"] if r["section"] == "nf4" and r["ms"] is not None]
    assert {"minilora double_quantize", "bnb dequantize_4bit"} <= {r["name"] for r in timed_nf4}
    for r in timed_nf4:  # every nf4 row: a median inside its quartiles, over rotating input buffers
        info = r["info"]
        assert info["q1_ms"] <= r["ms"] <= info["q3_ms"] and info["buffers"] == 2, r["name"]
    host = {r["name"]: r for r in data["rows"] if r["section"] == "host"}
    assert host["frozen bf16 nn.Linear"]["ratio"] == 1.0
    assert host["minilora fused LoRA"]["info"]["ops"] < host["minilora LoRALinear (readable)"]["info"]["ops"]
    assert {"minilora fused LoRA, module call", "same ops, bare autograd.Function"} <= set(host)
    assert [Row(**r) for r in data["rows"]]  # every row reads back into the record it was written from
    assert {"figure", "peer", "ours", "target", "met"} <= set(data["targets"][0])  # what chapter 10 reads
    assert (tmp_path / "bench.png").exists()
