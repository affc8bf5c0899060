"""minilora.fast.linear_cross_entropy and fuse_loss: the loss of a model's head taken a chunk of tokens at a
time equals the loss of the whole logits, with its gradients, and never reads a number back from the device."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minilora.fast import IGNORE_INDEX, fuse_loss, linear_cross_entropy
from tests.helpers import small_llama


def _problem(dtype: torch.dtype, n: int = 37, h: int = 16, v: int = 50):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.3).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[[0, 5, n - 1]] = IGNORE_INDEX
    return hidden, weight, targets


@pytest.mark.parametrize("chunk", [1, 8, 37, 64])
@pytest.mark.parametrize("num_items", [None, 50])
def test_chunks_give_the_loss_of_the_whole_logits(chunk, num_items):
    """Value and gradients (of the hidden states and of a trained head) as F.cross_entropy on all the logits,
    for chunks of one token, a ragged last chunk, one chunk and more than all; a mean or a sum / num_items; the
    incoming gradient (3 here) is applied, not assumed to be 1."""
    hidden, weight, targets = _problem(torch.float32)
    logits = F.linear(hidden, weight).float()
    if num_items is None:
        ref = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    else:
        ref = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum") / num_items
    want = torch.autograd.grad(3 * ref, (hidden, weight))
    got = linear_cross_entropy(hidden, weight, targets, num_items, chunk=chunk)
    have = torch.autograd.grad(3 * got, (hidden, weight))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(have, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_gradients_come_back_in_bf16():
    hidden, weight, targets = _problem(torch.bfloat16)
    ref = F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE_INDEX)
    want = torch.autograd.grad(ref, (hidden, weight))
    got = linear_cross_entropy(hidden, weight, targets, chunk=8)
    have = torch.autograd.grad(got, (hidden, weight))
    assert got.dtype == torch.float32 and [g.dtype for g in have] == [torch.bfloat16] * 2
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(have, want):  # both round dL/dlogits to bf16; float32 sums differ in order
        assert (a.float() - b.float()).abs().max() <= 0.01 * b.float().abs().max()


def test_nothing_is_read_back_from_the_device(monkeypatch):
    """The count of labelled tokens stays a tensor and backward does not test the incoming gradient: no tensor
    becomes a Python number (on a GPU each such read makes the host wait for the device)."""
    hidden, weight, targets = _problem(torch.float32)

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read back to the host")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch, "equal", refuse)
    linear_cross_entropy(hidden, weight, targets, chunk=8).backward()
    assert hidden.grad is not None


def test_fused_model_trains_as_the_model():
    """A small Llama with LoRA: fuse_loss gives the model's own loss (labels shifted as transformers shifts
    them, ignored labels skipped) and the same adapter gradients, returns no logits, and without labels the
    model answers as before. Calling it twice changes nothing."""
    model = small_llama(checkpointing=None)
    fused = fuse_loss(copy.deepcopy(model))
    assert fuse_loss(fused) is fused and fused.forward.fused_loss
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX
    ref = model(input_ids=ids, labels=labels)
    out = fused(input_ids=ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    ref.loss.backward()
    out.loss.backward()
    grads = [(a.grad, b.grad) for a, b in zip(model.parameters(), fused.parameters()) if a.requires_grad]
    assert grads and all(b is not None for _, b in grads)
    for a, b in grads:
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fused(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_head_it_cannot_compute_is_refused_unchanged():
    model = small_llama(checkpointing=None)
    forward = model.forward
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.lm_head.out_features))
    with pytest.raises(ValueError, match="bias"):
        fuse_loss(model)
    assert model.forward == forward
    model.lm_head.bias = None
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        fuse_loss(model)
    assert model.forward == forward


@pytest.mark.parametrize("bad", ["shape", "targets", "chunk"])
def test_bad_arguments_are_refused(bad):
    hidden, weight, targets = _problem(torch.float32)
    args = {"shape": (hidden, weight[:, :8], targets, None, 8), "targets": (hidden, weight, targets[:5], None, 8),
            "chunk": (hidden, weight, targets, None, 0)}[bad]
    with pytest.raises(ValueError):
        linear_cross_entropy(*args[:4], chunk=args[4])


def test_a_whole_model_graph_keeps_the_fused_loss():
    """`compile_model` with `fuse_loss`: one graph, the eager model's loss and gradients (Liger's fused
    cross-entropy computes a wrong loss inside a whole-model graph, bench/results/steps_wrong_loss.json)."""
    from torch._dynamo.utils import counters

    from minilora.fast import compile_model

    eager, model = small_llama(), small_llama()
    model.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    counters.clear()
    compiled = compile_model(fuse_loss(model))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = [m(input_ids=ids, labels=ids).loss for m in (eager, compiled)]
    for loss in losses:
        loss.backward()
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), eager.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * float(q.grad.abs().max()))


def _askers(step) -> list[str]:
    """'dir/file.py:function' of the code that read a tensor back to the host during step(), one per read."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    reads = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal"}
    torch_dir = str(Path(torch.__file__).parent)
    askers: list[str] = []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name in reads:
                frame = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith(torch_dir)][-1]
                askers.append("/".join(frame.filename.split("/")[-2:]) + ":" + frame.name)
            return func(*args, **(kwargs or {}))

    with Reads():
        step()
    return askers


@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
def test_a_training_step_reads_nothing_back_but_transformers_mask_check(qlora):
    """A fused LoRA / QLoRA Llama with fuse_loss, checkpointed, forward and backward: no read-back (on a GPU,
    a host wait) comes from minilora. The one there is belongs to transformers: with no attention mask and no
    cache its mask builder tests whether the position ids hold packed sequences
    (masking_utils.find_packed_sequence_indices), one `.all()` per forward."""
    from minilora.lora import LoRALinear

    model = small_llama(qlora=qlora)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.fused = True  # the fused path, as on a GPU
    fuse_loss(model)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    askers = _askers(lambda: model(input_ids=ids, labels=ids).loss.backward())
    assert not [a for a in askers if a.startswith("minilora/")], askers
    assert _askers(lambda: torch.ones(2).sum().item()) == ["tests/test_fast_loss.py:<lambda>"]  # it sees reads
