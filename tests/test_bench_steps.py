"""bench.steps on the tiny shape, on the CPU: every configuration runs in a process of its own and starts from
the same weights (the loss before any update agrees), with gradient checkpointing too; the folder saved for
peers that load from disk holds the same model. Not timed: the figures come from a GPU run."""

from __future__ import annotations

import json

import pytest
import torch

from bench import steps


def test_configurations_share_the_starting_loss(tmp_path):
    out = tmp_path / "steps.json"
    rc = steps.main(["--shape", "tiny", "--batch", "2", "--seq", "16", "--warmup", "0", "--steps", "1",
                     "--repeats", "1", "--checkpointing",
                     "--only", "full:eager,lora:eager,qlora:eager,qlora+offload:eager,peft-qlora:eager",
                     "--out", str(out)])
    assert rc == 0
    records = {r["method"]: r for r in json.loads(out.read_text())["records"]}
    assert all(r["checkpointing"] for r in records.values())
    # the suffix's plumbing (the tiny shape's layer inputs stay under offload's 1 MiB: tests/test_offload.py
    # checks the offloading itself)
    assert records["qlora+offload"]["loss_first_step"] == records["qlora"]["loss_first_step"]
    assert records["lora"]["loss_step0"] == pytest.approx(records["full"]["loss_step0"], abs=1e-6)
    # minilora's NF4 and bitsandbytes' round the same weights the same way
    assert records["peft-qlora"]["loss_step0"] == pytest.approx(records["qlora"]["loss_step0"], abs=1e-3)
    assert records["qlora"]["loss_step0"] != records["full"]["loss_step0"]


def test_an_unknown_mode_is_refused():  # rather than timed as eager under another name
    with pytest.raises(ValueError, match="unknown mode"):
        steps.run_one("lora", "whole", "tiny", 2, 16, 0, 1, 1, torch.device("cpu"))


def test_offload_needs_checkpointing():
    with pytest.raises(ValueError, match="needs --checkpointing"):
        steps.run_one("qlora+offload", "eager", "tiny", 2, 16, 0, 1, 1, torch.device("cpu"))


@pytest.mark.parametrize("mode", ["compile", "graphs"])
def test_fused_cross_entropy_stays_out_of_a_whole_model_compile(mode):
    with pytest.raises(ValueError, match="wrong loss"):
        steps.run_one("qlora+lce", mode, "tiny", 2, 16, 0, 1, 1, torch.device("cpu"))


def test_a_step_that_computes_another_loss_is_flagged():
    """A first step whose loss is not the model's (here a whole-model compile with Liger's fused cross-entropy
    on an H100, stored in steps_wrong_loss.json) is no figure: the table says so."""
    ok = {"loss_step0": 12.6131, "loss_first_step": 12.6141}
    assert steps.loss_agrees(ok) and not steps.loss_agrees(dict(ok, loss_first_step=2935.3))


@pytest.mark.parametrize("suffix", ["skipguards", "combo"])
def test_compiled_code_suffixes_need_a_compiled_mode(suffix):
    with pytest.raises(ValueError, match="compiled mode"):
        steps.run_one(f"lora+{suffix}", "eager", "tiny", 2, 16, 0, 1, 1, torch.device("cpu"))


def test_skipguards_steps_as_guarded():
    """Skipping the guards after the warm-up changes nothing a step computes here (shapes and modules fixed): the
    step after the timed ones has the guarded run's loss. The stance is restored for the tests that follow."""
    try:
        runs = [steps.run_one(m, "layers", "tiny", 2, 16, 1, 2, 1, torch.device("cpu"), checkpointing=True)
                for m in ("lora", "lora+skipguards")]
        assert torch._dynamo.eval_frame._stance.skip_guard_eval_unsafe  # the suffix took effect
    finally:
        torch.compiler.set_stance("default")
    assert runs[1]["loss_last_step"] == runs[0]["loss_last_step"] != runs[0]["loss_first_step"]


def test_former_forms_of_compile_layers():
    """compile_layers' former forms, kept to compare with: "eagerckpt" compiles each whole layer into one graph
    run inside the eager checkpoint; "parts" compiles each layer's attention, MLP and norms apart, one graph per
    kind of part (three: the two norms share one). All train alike (bf16 here: within its rounding)."""
    from torch._dynamo.utils import counters

    runs, graphs = {}, {}
    for mode in ("layers", "eagerckpt", "parts"):
        torch._dynamo.reset()
        counters.clear()
        runs[mode] = steps.run_one("lora", mode, "tiny", 2, 16, 1, 2, 1, torch.device("cpu"), checkpointing=True)
        graphs[mode] = counters["stats"]["unique_graphs"]
    assert graphs == {"layers": 1, "eagerckpt": 1, "parts": 3}
    for mode in ("eagerckpt", "parts"):
        assert runs[mode]["loss_last_step"] == pytest.approx(runs["layers"]["loss_last_step"], rel=1e-3)


def test_torchao_peer_starts_where_minilora_qlora_does(tmp_path):
    """torchao's NF4 peer, compiled layer by layer under checkpointing, rounds the same weights to 4 bits (its
    scales quantized its own way) and trains as many parameters. torchao is not part of the course's install
    (importing PEFT imports it when present, with messages on every import): skipped where it is absent."""
    pytest.importorskip("torchao")
    out = tmp_path / "steps.json"
    assert steps.main(["--shape", "tiny", "--batch", "2", "--seq", "16", "--warmup", "0", "--steps", "1",
                       "--repeats", "1", "--checkpointing", "--only", "qlora:eager,torchao-qlora:layers",
                       "--out", str(out)]) == 0
    records = {r["method"]: r for r in json.loads(out.read_text())["records"]}
    assert records["torchao-qlora"]["loss_step0"] == pytest.approx(records["qlora"]["loss_step0"], abs=1e-3)
    assert records["torchao-qlora"]["trainable"] == records["qlora"]["trainable"]


def test_saved_model_is_the_built_model(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("MINILORA_BENCH_CACHE", str(tmp_path))
    path = steps.saved_random_model("tiny", 16)
    assert steps.saved_random_model("tiny", 16) == path  # built once
    built = steps.build_model("tiny", 16, torch.device("cpu"))
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    # the weights, bit for bit (the logits may differ in the last bf16 bit: a loaded model keeps RoPE's
    # frequencies in float32, a model cast with .to(bfloat16) rounds them)
    saved, mine = loaded.state_dict(), built.state_dict()
    assert saved.keys() == mine.keys()
    assert all(torch.equal(saved[k], mine[k]) for k in mine)


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "GEMM"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "GEMM"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>", "attention"),
    ("_nf4_lora_weight_kernel", "nf4 dequantize / W' build"),
    ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*)", "nf4 dequantize / W' build"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float>", "cross-entropy"),
    ("void at::native::multi_tensor_apply_kernel<at::native::FusedAdamMathFunctor<float, 4>>", "optimizer"),
    ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "inductor fused"),
    ("_rms_layernorm_forward", "norm / rotary / activation"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel>", "norm / rotary / activation"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>", "copy / cast"),
    ("Memcpy DtoH (Device -> Pinned)", "host transfer"),
    ("Memcpy DtoD (Device -> Device)", "copy / cast"),
    ("void at::native::reduce_kernel<512, 1, at::native::MeanOps<float>>", "other"),
])
def test_kernel_kinds(name, kind):
    assert steps.kernel_kind(name) == kind


def test_peak_of_replays_an_allocation_trace():
    """The step's peak is the most held at once, and what was alive then is summed by where it was allocated."""
    from bench.steps import peak_of

    def frame(path, line, name):
        return {"filename": path, "line": line, "name": name}

    lora = [frame("/x/site-packages/minilora/fast.py", 10, "_build"), frame("/x/torch/nn/modules/module.py", 1, "f")]
    compiled = [frame("/tmp/torchinductor_root/ab/cab.py", 7, "call")]
    mib = 2**20
    trace = [{"action": "alloc", "addr": 1, "size": 100 * mib, "frames": lora},
             {"action": "alloc", "addr": 2, "size": 50 * mib, "frames": compiled},
             {"action": "free_requested", "addr": 1, "size": 100 * mib, "frames": lora},
             {"action": "free_completed", "addr": 1, "size": 100 * mib, "frames": lora},
             {"action": "alloc", "addr": 3, "size": 60 * mib, "frames": lora},   # 110 MiB: below the peak
             {"action": "alloc", "addr": 4, "size": 10 * mib, "frames": []}]     # 120 MiB: still below
    out = peak_of(trace)
    assert out["step_peak_gib"] == pytest.approx(150 / 1024)
    assert out["mib_by_site"] == {"minilora/fast.py:10 _build": 100.0, "compiled code:7 call": 50.0}


def test_stream_gaps_tells_a_late_host_from_a_queue():
    """Two steps on one stream: an idle stretch whose kernel was launched after it began is the host's, one
    whose kernel waited queued is the queue's; the time between steps counts for neither; a side stream's
    copy and a kernel launched before the steps are no part of the account."""
    from bench.steps import stream_gaps

    events: list[dict] = []

    def span(name, ts, dur):
        events.append({"ph": "X", "cat": "user_annotation", "name": name, "ts": ts, "dur": dur})

    def kernel(name, launch, ts, dur, stream=7, cat="kernel"):
        corr = len(events) + 1000
        events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": launch, "dur": 2,
                       "args": {"correlation": corr}})
        events.append({"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur,
                       "args": {"stream": stream, "correlation": corr}})

    kernel("before", -50, -45, 10)  # launched before the profiled steps: not counted
    for t0 in (0, 1000):  # two steps, 1000 us apart (the benchmark waits between them)
        span("forward", t0, 300)
        span("backward", t0 + 300, 200)
        span("optimizer", t0 + 500, 20)
        kernel("gemm", t0 + 10, t0 + 15, 100)     # 15 us after the step began: the host issued it late
        kernel("norm", t0 + 20, t0 + 117, 50)     # queued 2 us behind the gemm
        kernel("late", t0 + 400, t0 + 405, 100)   # the host came back 238 us after the stream fell idle
        events.append({"ph": "X", "cat": "cpu_op", "name": "unpack", "ts": t0 + 150, "dur": 300})  # meanwhile
        kernel("copy", t0 + 30, t0 + 40, 400, stream=9, cat="gpu_memcpy")  # a side stream: not ours
        kernel("adam", t0 + 506, t0 + 510, 50)    # 5 us: launched after the stretch began
    events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 290, "dur": 80})
    events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaEventSynchronize", "ts": 600, "dur": 300})
    out = stream_gaps(events, steps=2)
    assert out["kernels"] == 4
    assert out["host_ms"] == pytest.approx((15 + 238 + 5) / 1e3)
    assert out["queued_ms"] == pytest.approx(2 / 1e3)
    assert out["by_phase"]["backward"]["host"] == pytest.approx(0.238)
    assert out["by_phase"]["forward"] == {"host": pytest.approx(0.015), "queued": pytest.approx(0.002)}
    # what the host ran in that stretch (167 -> 400 us): its part of the op and the synchronization inside it
    assert out["longest"][0] == {"us": 238.0, "kind": "host", "phase": "backward", "next": "late",
                                 "host_did": {"unpack": 233.0, "cudaStreamSynchronize": 80.0}}
    assert out["by_length"]["50 us-1 ms"]["count"] == 1
    assert out["syncs"] == {"cudaStreamSynchronize (forward)": {"count": 0.5, "ms": pytest.approx(0.04)}}


def test_parity_paths_train_the_same_model(tmp_path):
    """bench.parity's paths start from one model and batch per seed (the same first loss), their first
    gradients agree with the readable layer's to bf16 rounding, the float32 path is the model in float32, and
    another seed is another model and batch."""
    from bench import parity

    out = tmp_path / "parity.json"
    assert parity.main(["--shape", "tiny", "--batch", "1", "--seq", "16", "--steps", "2", "--seeds", "2",
                        "--out", str(out),
                        "--paths", "readable,readable/float32,fused/torch-build,fused/one-rounding"]) == 0
    paths = json.loads(out.read_text())["paths"]
    assert {p: len(r["losses"]) for p, r in paths.items()} == dict.fromkeys(paths, 2)
    for seed in (0, 1):
        first = {p: r["losses"][seed][0] for p, r in paths.items()}
        assert len({round(v, 5) for p, v in first.items() if p != "readable/float32"}) == 1, first
        assert first["readable/float32"] == pytest.approx(first["readable"], rel=1e-2)
        for p in ("fused/torch-build", "fused/one-rounding"):
            assert paths[p]["grads"][seed][0]["rel"] < 5e-2, (p, paths[p]["grads"])
    assert paths["readable"]["losses"][0][0] != paths["readable"]["losses"][1][0]
