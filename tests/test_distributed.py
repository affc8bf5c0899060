"""minilora under torch.distributed: DDP and FSDP2 on 2 CPU processes over gloo.

One process launch for the whole module (it costs seconds of imports): `_scenarios` runs every scenario
on both ranks and returns the numbers the tests below assert on; the last one drops rank 1 out of the
group in the middle of a save. The reference for "equal to one process" is the same model trained on the
whole batch in one process (rank 0 runs it before each distributed run).

Tolerances: float32 throughout. Two ranks sum their gradients in another order than one process does:
the first step's averaged gradients agree with the whole batch's to float32 rounding (relative 1e-5 allowed),
which a sum in place of a mean, or a gradient left unreduced, fails by far. The parameters after 2 AdamW
steps agree less closely (ADAPTER_ATOL says why), so they alone could not tell a mean from a sum: Adam's step
does not see the gradient's scale. The 4-bit bytes, the adapter files and the forward of the same values are
compared exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import minilora
from minilora import distributed as D
from minilora import io as adapter_io
from minilora.course.launch import first_step_grads, gather_check, run_on_ranks, tiny_llama, train_steps
from minilora.nf4 import quantize_nf4
from minilora.qlora import LinearNF4

WORLD = 2
STEPS = 2
ATOL = 1e-5  # losses: float32 rounding of another summation order
# adapters after AdamW steps: a gradient near zero whose rounding differs moves its parameter by a visibly
# different amount (Adam's first updates follow the sign); 1.6e-5 measured on an AMD EPYC CPU, a wrong step
# moves parameters by about lr = 1e-2
ADAPTER_ATOL = 1e-4
GRAD_RTOL = 1e-5  # the first step's averaged gradients, relative to the largest gradient value
# (name, wrapper, 4-bit base, DoRA)
CONFIGS = (("fsdp-qlora", "fsdp", True, False), ("fsdp-qdora", "fsdp", True, True),
           ("fsdp-lora", "fsdp", False, False), ("ddp-qlora", "ddp", True, False), ("ddp-dora", "ddp", False, True))


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())} if directory.exists() else {}


def _content(directory: Path) -> tuple:
    """An adapter directory's content: config bytes, weights metadata, every tensor's dtype, shape and bytes.

    Not the weights file's raw bytes: safetensors writes its metadata from a hash map whose order changes
    from one save to the next (even in one process), so two saves of the same adapter can differ there.
    """
    from safetensors import safe_open

    with safe_open(directory / adapter_io.WEIGHTS_NAME, framework="pt") as f:
        tensors = {k: (str(t.dtype), tuple(t.shape), t.numpy().tobytes())
                   for k in sorted(f.keys()) for t in [f.get_tensor(k)]}
        metadata = f.metadata()
    return (directory / adapter_io.CONFIG_NAME).read_bytes(), metadata, tensors


def _wrap(model: nn.Module, how: str) -> tuple[nn.Module, D.CommCounter]:
    counter = D.CommCounter()
    if how == "fsdp":
        return D.shard_model(model), counter
    ddp = D.wrap_ddp(model)
    counter.attach(ddp)
    return ddp, counter


def _padded_bytes(params: list[torch.Tensor], world: int) -> int:
    # FSDP2 reduce-scatters each gradient padded along dim 0 to a multiple of the world size
    return sum(math.ceil(p.shape[0] / world) * world * (p.numel() // p.shape[0]) * p.element_size() for p in params)


def _training(rank: int, world: int) -> dict:
    out = {}
    for name, how, qlora, dora in CONFIGS:
        ref = tiny_llama(qlora=qlora, use_dora=dora)
        ref_grads: dict[str, torch.Tensor] = {}
        if rank == 0:  # the one-process run (rank 1 needs only the untrained model's sizes)
            ref_losses, _ = train_steps(ref, 0, 1, steps=STEPS, after_backward=first_step_grads(ref, ref_grads))
            expected = adapter_io.adapter_state_dict(ref)

        model = tiny_llama(qlora=qlora, use_dora=dora)
        trainable = [p for p in model.parameters() if p.requires_grad]
        model, counter = _wrap(model, how)
        grads: dict[str, torch.Tensor] = {}
        with counter.watch():
            losses, _ = train_steps(model, rank, world, steps=STEPS, after_backward=first_step_grads(model, grads))
        frozen_grads = [n for n, p in D.unwrap(model).named_parameters() if not p.requires_grad and p.grad is not None]
        mean_losses = torch.tensor(losses)
        dist.all_reduce(mean_losses)
        with D.gathered_adapters(model) as whole:
            got = adapter_io.adapter_state_dict(whole)
        if rank == 0:  # the gathered adapters are the same tensors on every rank
            out[name] = {
                "max_diff": max((got[k] - expected[k]).abs().max().item() for k in expected),
                "same_keys": sorted(got) == sorted(expected),
                "loss_diff": (mean_losses / world - torch.tensor(ref_losses)).abs().max().item(),
                "grad_keys": sorted(grads) == sorted(ref_grads),
                "grad_diff": max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads),
                "grad_scale": max(g.abs().max().item() for g in ref_grads.values())}
        out.setdefault(name, {}).update({
            "bytes": {k: v // STEPS for k, v in counter.bytes.items()},
            "dtypes": {k: sorted(str(d) for d in v) for k, v in counter.dtypes.items()},
            "trainable_bytes": sum(p.nbytes for p in trainable),
            "padded_trainable_bytes": _padded_bytes(trainable, world),
            "frozen_grads": frozen_grads,
            "held": D.held_bytes(model),
            "held_one_process": D.held_bytes(ref),
        })
    return out


def _reinit_adapters(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))


def _saving(rank: int, world: int, tmp: str) -> dict:
    tmp_path = Path(tmp)
    out: dict = {}
    one = tiny_llama()
    sharded, ddp = D.shard_model(tiny_llama()), D.wrap_ddp(tiny_llama())
    if rank == 0:
        minilora.save_adapter(one, tmp_path / "one")
    D.save_adapter(sharded, tmp_path / "fsdp")
    D.save_adapter(ddp, tmp_path / "ddp")
    dist.barrier()
    reference = _content(tmp_path / "one")
    out["fsdp_same_file"] = _content(tmp_path / "fsdp") == reference
    out["ddp_same_file"] = _content(tmp_path / "ddp") == reference

    # load a trained adapter into a sharded model whose adapters hold something else
    trained = tiny_llama()
    _reinit_adapters(trained, seed=3)
    if rank == 0:
        minilora.save_adapter(trained, tmp_path / "trained")
    dist.barrier()
    fresh = tiny_llama()
    _reinit_adapters(fresh, seed=4)
    D.shard_model(fresh)
    D.load_adapter(fresh, tmp_path / "trained")
    with D.gathered_adapters(fresh) as whole:
        got = adapter_io.adapter_state_dict(whole)
    wanted = adapter_io.adapter_state_dict(trained)
    out["load_equal"] = all(torch.equal(got[k], wanted[k]) for k in wanted)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(5))
    out["load_forward_diff"] = (fresh(input_ids=ids).logits - trained(input_ids=ids).logits).abs().max().item()

    # rank 1 cannot read the file (no shared disk, say): no rank keeps what it read
    try:
        D.load_adapter(fresh, tmp_path / ("fsdp" if rank == 0 else "missing"))
        out["partial_load_raised"] = False
    except (OSError, RuntimeError) as err:
        out["partial_load_raised"] = type(err).__name__
    with D.gathered_adapters(fresh) as whole:
        after = adapter_io.adapter_state_dict(whole)
    out["partial_load_unchanged"] = all(torch.equal(after[k], got[k]) for k in got)

    # rank 0 fails half-way through writing: every rank raises, the previous pair stays as it was
    before = _files(tmp_path / "fsdp")
    _reinit_adapters(one, seed=9)  # not used below; keeps the ranks' work alike
    import safetensors.torch as st

    real_save = st.save_file

    def half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError("No space left on device (simulated)")

    if rank == 0:
        st.save_file = half_then_fail
    try:
        D.save_adapter(sharded, tmp_path / "fsdp")
        out["writer_failure_raised"] = False
    except (OSError, RuntimeError) as err:
        out["writer_failure_raised"] = type(err).__name__
    finally:
        st.save_file = real_save
    dist.barrier()
    out["writer_failure_intact"] = _files(tmp_path / "fsdp") == before
    out["stray_files"] = [p.name for p in (tmp_path / "fsdp").iterdir() if p.name.startswith(".")]

    # rank 1 fails before the gather: nobody writes, nobody waits forever
    real_layers = adapter_io._adapter_layers
    if rank == 1:
        adapter_io._adapter_layers = lambda *a: (_ for _ in ()).throw(ValueError("simulated failure on rank 1"))
    try:
        D.save_adapter(sharded, tmp_path / "fsdp")
        out["peer_failure_raised"] = False
    except (ValueError, RuntimeError) as err:
        out["peer_failure_raised"] = type(err).__name__
    finally:
        adapter_io._adapter_layers = real_layers
    out["peer_failure_intact"] = _files(tmp_path / "fsdp") == before
    return out


def _peer_dies(rank: int, world: int, tmp: str) -> dict:
    """Rank 1 drops out in the middle of the adapters' gather; rank 0 must raise and leave the old files.

    Rank 1 closes its connections (destroys its process group) where a crashed process's would be closed
    by its operating system: rank 0 sees the same lost peer. Last scenario: the group is gone afterwards.
    """
    from torch.distributed.tensor import DTensor

    model = D.shard_model(tiny_llama(qlora=True, hidden=32, layers=1))
    D.save_adapter(model, Path(tmp) / "dies")
    before = _files(Path(tmp) / "dies")
    real = DTensor.full_tensor
    calls = iter(range(10**6))

    def drop_out_on_third(self, *args, **kwargs):
        if rank == 1 and next(calls) == 2:
            dist.destroy_process_group()
            raise SystemExit("rank 1 is gone")
        return real(self, *args, **kwargs)

    DTensor.full_tensor = drop_out_on_third
    try:
        D.save_adapter(model, Path(tmp) / "dies")
        raised = None
    except (Exception, SystemExit) as err:  # gloo reports the lost peer as a RuntimeError
        raised = type(err).__name__
    finally:
        DTensor.full_tensor = real
    return {"raised": raised, "intact": _files(Path(tmp) / "dies") == before}


def _scenarios(rank: int, world: int, tmp: str) -> dict:
    import time

    out, seconds = {}, {}
    for name, fn, args in (("training", _training, ()), ("all_gather", gather_check, ()),
                           ("saving", _saving, (tmp,)), ("peer_dies", _peer_dies, (tmp,))):
        start = time.perf_counter()
        out[name] = fn(rank, world, *args)
        seconds[name] = round(time.perf_counter() - start, 2)
    out["seconds"] = seconds
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    return run_on_ranks(_scenarios, WORLD, str(tmp_path_factory.mktemp("dist")), timeout=600)


# ---------------------------------------------------------------------------------------------------------
# Training equals one process


@pytest.mark.parametrize("name", [c[0] for c in CONFIGS])
def test_steps_equal_one_process(results, name):
    t = results[0]["training"][name]
    assert t["same_keys"], name
    assert t["max_diff"] < ADAPTER_ATOL, f"{name}: adapters differ by {t['max_diff']:.2e}"
    assert t["loss_diff"] < ATOL, f"{name}: mean loss differs by {t['loss_diff']:.2e}"
    assert t["grad_keys"] and t["grad_scale"] > 0, name
    assert t["grad_diff"] <= GRAD_RTOL * t["grad_scale"], \
        f"{name}: the first step's averaged gradients differ by {t['grad_diff']:.2e} (largest {t['grad_scale']:.2e})"


@pytest.mark.parametrize("name", ["ddp-qlora", "ddp-dora"])
def test_ddp_reduces_only_adapter_gradients(results, name):
    t = results[0]["training"][name]
    assert t["bytes"] == {"all_reduce": t["trainable_bytes"]}, t
    assert t["frozen_grads"] == []


@pytest.mark.parametrize("name", ["fsdp-qlora", "fsdp-qdora", "fsdp-lora"])
def test_fsdp_reduces_only_adapter_gradients(results, name):
    t = results[0]["training"][name]
    assert t["bytes"]["reduce_scatter"] == t["padded_trainable_bytes"], t
    assert t["frozen_grads"] == []


def test_fsdp_shards_the_4bit_base(results):
    for rank, r in enumerate(results):
        t = r["training"]["fsdp-qlora"]
        whole = t["held_one_process"]["base_4bit"]
        assert whole > 0
        # each rank keeps its half (each tensor's dim-0 chunk; rounding up by at most a few bytes per tensor)
        assert abs(t["held"]["base_4bit"] - whole / WORLD) < 64 * 8, (rank, t["held"], whole)
        assert t["held"]["adapters"] < t["held_one_process"]["adapters"] * 0.6
        ddp = r["training"]["ddp-qlora"]
        assert ddp["held"]["base_4bit"] == whole  # DDP: every rank holds everything


# ---------------------------------------------------------------------------------------------------------
# The 4-bit bytes travel as bytes


def test_nf4_bytes_survive_all_gather_bit_for_bit(results):
    for r in results:
        a = r["all_gather"]
        assert a["nan_float16"] == 2046 and a["nan_bfloat16"] == 254  # every NaN pattern of both formats
        assert a["bit_equal"]
        assert a["shard_bytes"] == a["total_bytes"] // WORLD
        assert a["forward_equal"]
        assert a["all_gather_dtypes"] == ["uint8"], a["all_gather_dtypes"]  # never gathered as floats


# ---------------------------------------------------------------------------------------------------------
# Adapter files


def test_sharded_save_writes_the_one_process_file(results):
    for r in results:
        assert r["saving"]["fsdp_same_file"] and r["saving"]["ddp_same_file"]


def test_load_restores_on_every_rank(results):
    for r in results:
        assert r["saving"]["load_equal"]
        assert r["saving"]["load_forward_diff"] < 1e-5


def test_load_failing_on_one_rank_changes_no_rank(results):
    assert [r["saving"]["partial_load_raised"] for r in results] == ["RuntimeError", "FileNotFoundError"]
    assert all(r["saving"]["partial_load_unchanged"] for r in results)


def test_failed_write_on_rank0_loses_nothing(results):
    for r in results:
        s = r["saving"]
        assert s["writer_failure_raised"], "every rank must raise"
        assert s["writer_failure_intact"] and s["stray_files"] == []


def test_failure_on_another_rank_writes_nothing(results):
    for r in results:
        assert r["saving"]["peer_failure_raised"] and r["saving"]["peer_failure_intact"]


def test_rank_dropping_out_mid_save_loses_nothing(results):
    rank0, rank1 = (r["peer_dies"] for r in results)
    assert rank1["raised"] == "SystemExit"
    assert rank0["raised"], "rank 0 must notice the lost peer"
    assert rank0["intact"] and rank1["intact"]


# ---------------------------------------------------------------------------------------------------------
# One process: the pieces on their own


def test_shardable_layer_computes_what_linear_nf4_does():
    model = tiny_llama(hidden=32, layers=1)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    quantized = {n: m.quantized for n, m in model.named_modules() if isinstance(m, LinearNF4)}
    D.make_shardable(model)
    after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    for n, m in model.named_modules():
        if n in quantized:
            assert isinstance(m, D.ShardableLinearNF4)
            assert all(p.dtype == torch.uint8 and not p.requires_grad for p in m.parameters(recurse=False)
                       if p is not m.bias)
            assert torch.equal(m.dequantize(), quantized[n].dequantize(torch.float32))
    layer = model.model.layers[0].mlp.down_proj.base_layer
    other = quantize_nf4(torch.randn(layer.out_features, layer.in_features), double_quant=True)
    layer.load_quantized(other)  # copied as bytes into the uint8 parameters
    assert torch.equal(layer.dequantize(), other.dequantize(torch.float32))
    model.to(torch.bfloat16)  # floating parameters cast; the byte parameters do not
    assert all(m.weight_packed.dtype == torch.uint8 for m in model.modules() if isinstance(m, LinearNF4))


def test_save_and_load_in_one_process_are_io(tmp_path):
    model = tiny_llama(hidden=32, layers=1)
    D.save_adapter(model, tmp_path / "a")
    minilora.save_adapter(model, tmp_path / "b")
    assert _content(tmp_path / "a") == _content(tmp_path / "b")
    with pytest.raises(ValueError, match="no adapter"):
        D.save_adapter(model, tmp_path / "c", adapter_name="other")
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="inject it"):
        D.load_adapter(model, tmp_path / "a", adapter_name="other")
