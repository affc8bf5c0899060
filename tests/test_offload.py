"""minilora.fast.offload_checkpoints: checkpointed layer inputs kept in host memory, fetched one layer ahead.

On a CPU the copies are clones, so these tests check what does not depend on a GPU: the step computes exactly
what plain checkpointing computes, one input per layer is offloaded, and backward fetches each layer's input
before it asks for it (the one packed before the layer being differentiated)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import SMALL_LLAMA_TARGETS, small_llama
from minilora.fast import HostOffload, offload_checkpoints

LAYERS = 3  # small_llama's default


def step(m: nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1)).to(m.device)
    loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the side-stream copies need a GPU"))])
def test_offloaded_step_equals_checkpointed_step_and_fetches_one_layer_ahead(monkeypatch, device):
    """On a GPU the copies are real (pinned host memory, a side stream, events); on a CPU they are clones."""
    plain, offloaded = small_llama(device=device), small_llama(device=device)
    offloaded.load_state_dict(plain.state_dict())
    offload = offload_checkpoints(offloaded, min_bytes=1)
    packed, events = [], []
    pack, fetch, unpack = offload.pack, offload._fetch, offload.unpack
    monkeypatch.setattr(offload, "pack", lambda t: packed.append(pack(t)) or packed[-1])
    monkeypatch.setattr(offload, "_fetch", lambda h: events.append(("fetch", packed.index(h))) or fetch(h))
    monkeypatch.setattr(offload, "unpack", lambda h: events.append(("ask", packed.index(h))) or unpack(h))

    loss, grads = step(plain)
    loss_off, grads_off = step(offloaded)
    assert loss_off == loss  # the forward is the same either way
    assert grads_off.keys() == grads.keys() and len(grads) == LAYERS * len(SMALL_LLAMA_TARGETS) * 2
    for n, g in grads.items():  # the same operations on the same values (a GPU's atomics may reorder sums)
        exact = device == "cpu"
        torch.testing.assert_close(grads_off[n], g, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-7, msg=n)
    # one saved tensor per layer, its input (batch, seq, hidden); each but the last copied out, fetched once and
    # asked for once; the last layer's input never left the device (backward asks for it first)
    last = LAYERS - 1
    assert [tuple(h.host.shape) for h in packed[:last]] == [(2, 16, 64)] * last and packed[last].host is None
    assert sorted(events) == sorted([("ask", i) for i in range(LAYERS)] + [("fetch", i) for i in range(last)])
    # asking for the last layer's input fetches the one before, and so on: each earlier layer's input is on
    # its way while the layer after it is recomputed
    assert events[:2] == [("ask", last), ("fetch", last - 1)]
    for i in range(last):
        assert events.index(("fetch", i)) < events.index(("ask", i))


def test_small_tensors_stay_where_they_are():
    offload = HostOffload(min_bytes=1 << 20)
    t = torch.ones(4)
    assert offload.pack(t) is t and offload.unpack(t) is t and not offload.order


def test_needs_checkpointing_and_wraps_once():
    with pytest.raises(ValueError, match="gradient-checkpointed"):
        offload_checkpoints(small_llama(None))
    m = small_llama()
    first = offload_checkpoints(m)
    second = offload_checkpoints(m)
    for mod in m.modules():
        if getattr(mod, "gradient_checkpointing", False):
            func = mod._gradient_checkpointing_func
            assert func.offload is second and func.inner.__dict__.get("offload") is None
    assert first is not second
