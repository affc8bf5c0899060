import json
import time

import pytest
import torch

from minilora import profiling


def test_pick_device_defaults_to_cuda_or_cpu(monkeypatch):
    monkeypatch.delenv("MINILORA_DEVICE", raising=False)
    assert profiling.pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_pick_device_override(monkeypatch):
    monkeypatch.setenv("MINILORA_DEVICE", "cpu")
    assert profiling.pick_device() == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_pick_device_cuda_override_without_gpu_is_an_error(monkeypatch):
    monkeypatch.setenv("MINILORA_DEVICE", "cuda")
    with pytest.raises(RuntimeError, match="no CUDA"):
        profiling.pick_device()


def test_bf16_only_on_capable_gpus():
    assert profiling.supports_bf16("cpu") is False
    assert profiling.train_dtype("cpu") == torch.float32


def test_time_fn_reports_median_of_reps():
    calls = []
    sleeps = iter([0.0] * 2 + [0.001, 0.020, 0.001, 0.001, 0.001])

    def fn():
        calls.append(1)
        time.sleep(next(sleeps))

    t = profiling.time_fn(fn, warmup=2, reps=5, device="cpu")
    assert len(calls) == 7
    assert t.reps == 5 and t.clock == "perf_counter"
    # the one 20 ms outlier moves the max but not the median
    assert t.max_ms >= 20 and 0.9 <= t.median_ms < 10
    with pytest.raises(ValueError):
        profiling.time_fn(fn, reps=0, device="cpu")


def test_time_fn_reports_quartiles_and_iqr():
    # four fast calls and four slow ones: the quartiles fall in each group, the IQR spans the gap
    sleeps = iter([0.001] * 4 + [0.012] * 4)
    t = profiling.time_fn(lambda: time.sleep(next(sleeps)), warmup=0, reps=8, device="cpu")
    assert t.min_ms <= t.q1_ms <= t.median_ms <= t.q3_ms <= t.max_ms
    assert t.q1_ms < 10 and t.q3_ms >= 12 and t.iqr_ms == pytest.approx(t.q3_ms - t.q1_ms)
    assert "IQR" in str(t) and "perf_counter" in str(t)
    # one repeat: no spread to report, the quartiles are the one time
    one = profiling.time_fn(lambda: None, warmup=0, reps=1, device="cpu")
    assert one.q1_ms == one.median_ms == one.q3_ms and one.iqr_ms == 0.0


def test_time_fn_docstring_says_what_cuda_events_measure():
    # CUDA events time the stream: with a slow host that is the host's pace, not the GPU's work
    doc = profiling.time_fn.__doc__
    assert "host" in doc and "time_queued" in doc and "IQR" in doc



def test_time_rotating_cycles_buffers_and_reports_quartiles():
    calls = [0, 0, 0]

    def make(i):
        def fn():
            calls[i] += 1
            time.sleep(0.001 * (i + 1))  # buffer i takes (i + 1) ms: quartiles must separate them
        return fn

    spread = profiling.time_rotating([make(i) for i in range(3)], warmup=3, reps=12, device=torch.device("cpu"))
    assert calls == [5, 5, 5]  # warm-up and timed calls go round the buffers in turn
    assert spread["reps"] == 12 and spread["buffers"] == 3 and spread["clock"] == "perf_counter"
    assert spread["min_ms"] <= spread["q1_ms"] <= spread["median_ms"] <= spread["q3_ms"] <= spread["max_ms"]
    assert spread["min_ms"] >= 1.0 and spread["max_ms"] >= 3.0 and spread["iqr_ms"] >= 0.9
    with pytest.raises(ValueError):
        profiling.time_rotating([], warmup=0, reps=1, device=torch.device("cpu"))
    # on a CPU there is no queue to fill: time_queued is time_rotating
    queued = profiling.time_queued([make(0)], warmup=0, reps=3, device=torch.device("cpu"))
    assert queued["clock"] == "perf_counter" and queued["reps"] == 3


def test_measure_ceilings_on_a_cpu():
    ceil = profiling.measure_ceilings("cpu", warmup=0, reps=1)
    assert ceil["copy_TBps"] > 0 and ceil["matmul_bf16_TFLOPs"] > 0 and ceil["matmul_size"] == 256

def test_saved_tensor_bytes_counts_activations_once_and_not_parameters():
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64, requires_grad=True)
    with profiling.SavedTensorBytes(exclude=lin.parameters()) as saved:
        y = torch.relu(lin(x))
    # Linear saves its input x (8*64 fp32); relu saves its output (8*32 fp32); the weight is not counted.
    assert saved.bytes == 8 * 64 * 4 + 8 * 32 * 4
    y.sum().backward()
    # without the exclusion, the saved view of the weight (64*32 fp32) is counted too
    with profiling.SavedTensorBytes() as everything:
        torch.relu(lin(x))
    assert everything.bytes == saved.bytes + 64 * 32 * 4


def test_saved_tensor_bytes_is_zero_without_grad():
    lin = torch.nn.Linear(16, 16)
    with torch.no_grad(), profiling.SavedTensorBytes() as saved:
        lin(torch.randn(4, 16))
    assert saved.bytes == 0


def test_environment_records_where_a_figure_came_from():
    env = profiling.environment("cpu")
    d = env.as_dict()
    json.dumps(d)
    assert d["torch"] == torch.__version__ and d["device"] == "cpu"
    assert d["date"].endswith("UTC") and d["packages"]["minilora"]
    assert "torch" in str(env)


def test_peak_memory_refuses_cpu():
    with pytest.raises(RuntimeError, match="CUDA"):
        profiling.peak_memory(lambda: None, device="cpu")


@pytest.mark.cuda
def test_peak_memory_sees_an_allocation():
    n = 64 * 2**20

    def alloc():
        t = torch.empty(n, dtype=torch.uint8, device="cuda")
        del t

    assert profiling.peak_memory(alloc, device="cuda") >= n
