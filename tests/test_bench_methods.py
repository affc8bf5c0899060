"""bench/methods.py (chapter 12's methods on a GPU) at the tiny shape on a CPU: every configuration runs, the
record holds what chapter 12 reads, and the counts agree with the methods' definitions. Nothing is timed here."""

from __future__ import annotations

import json

import pytest

from bench import methods


def test_methods_tiny_runs_every_configuration(tmp_path):
    out = tmp_path / "sub" / "methods.json"
    rc = methods.main(["--shape", "tiny", "--train", "2x8", "--infer", "1x8,4x8", "--warmup", "0", "--steps", "1",
                       "--repeats", "3", "--out", str(out)])
    data = json.loads(out.read_text())
    assert rc == 0 and not [r for r in data["train"] + data["inference"] if "error" in r]
    assert {"date", "device", "torch", "dtype", "environment", "settings", "note"} <= set(data)
    train = {r["method"]: r for r in data["train"]}
    assert set(train) == set(methods.TRAIN_METHODS)
    for r in train.values():  # a median inside its min-max, over the windows asked for
        assert len(r["windows"]) == 3 and r["gpu_ms_min"] <= r["gpu_ms"] <= r["gpu_ms_max"]
        assert r["host_ms"] > 0 and r["peak_mib"] is None  # no CUDA peak on a CPU
    head = train["head only"]["trainable"]
    assert head == 2 * methods.SHAPES["tiny"]["hidden_size"] + 2
    assert train["full FT"]["trainable"] == train["full FT"]["total_params"]
    # prefix: p tokens x layers x (K, V) x hidden; adapters: 2 per layer of 2·d·m + m + d
    d, layers = methods.SHAPES["tiny"]["hidden_size"], methods.SHAPES["tiny"]["num_hidden_layers"]
    assert train["prefix"]["trainable"] - head == methods.PREFIX * layers * 2 * d
    m = methods.BOTTLENECK
    assert train["adapters"]["trainable"] - head == 2 * layers * (2 * d * m + m + d)
    assert head < train["prefix"]["trainable"] < train["LoRA"]["trainable"] < train["full FT"]["trainable"]
    infer = [r for r in data["inference"] if r["batch"] == 1]
    assert [r["variant"] for r in infer] == list(methods.VARIANTS)
    by = {r["variant"]: r for r in infer}
    assert by["LoRA merged"]["extra_params"] == 0 and by["LoRA merged"]["merged_vs_unmerged_max_abs"] < 1e-4
    assert by["prefix (10 tokens)"]["positions_left"] == methods.SHAPES["tiny"]["max_position_embeddings"] - methods.PREFIX
    assert by[f"base (seq + {methods.PREFIX} tokens)"]["seq"] == 8 + methods.PREFIX
    assert "training step, tiny" in data["table"] and "inference, tiny, batch 4 x 8" in data["table"]


def test_methods_refuses_bad_arguments():
    with pytest.raises(SystemExit, match="unknown shape"):
        methods.main(["--shape", "gpt5"])
    with pytest.raises(SystemExit, match="batch x seq"):
        methods.main(["--shape", "tiny", "--train", "32by128"])
