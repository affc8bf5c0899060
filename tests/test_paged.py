"""PagedAdamW against torch.optim.AdamW: same parameters, same state, interchangeable checkpoints.

On the CPU the paged optimizer is plain AdamW, so fp32 results must agree bit for bit. The chunk pipeline
(pieces, slots, split parameters) also runs on the CPU when `_chunk_cpu_params` is set: synchronous copies,
no streams, the same bookkeeping as on a GPU. CUDA-only tests check the streamed version and pinned memory.
"""

import copy
import math
import warnings

import pytest
import torch

from minilora.paged import BYTES_PER_ELEMENT, PagedAdamW, Piece, adamw_update_, plan_chunks

pytestmark = pytest.mark.filterwarnings("ignore:.*PagedAdamW runs as plain AdamW on the CPU")

SHAPES = [(7, 5), (13,), (3, 3), (4, 6), (0,)]  # includes an empty parameter


def _params(device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * 0.1).to(device=device, dtype=dtype).requires_grad_() for s in SHAPES]


def _groups(params):
    # three groups with different settings; the last parameter of group 0 never gets a gradient
    return [
        {"params": params[:2]},
        {"params": params[2:4], "lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.3},
        {"params": params[4:], "weight_decay": 0.0},
    ]


def _grads(params, step, seed=1):
    """Gradients for one step: params[3] has none on odd steps, params[1] never has one after step 0."""
    g = torch.Generator().manual_seed(seed + step)
    out = []
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=g) * 0.01
        none = (i == 3 and step % 2 == 1) or (i == 1 and step > 0)
        out.append(None if none else grad.to(device=p.device, dtype=p.dtype))
    return out


def _run(opt, params, steps, start=0):
    for t in range(start, start + steps):
        for p, g in zip(params, _grads(params, t)):
            p.grad = None if g is None else g.clone()
        opt.step()


def _torch_adamw(params, **kw):
    return torch.optim.AdamW(_groups(params), lr=1e-2, foreach=False, **kw)


def _paged(params, **kw):
    return PagedAdamW(_groups(params), lr=1e-2, **kw)


def _assert_same(a, b, atol=0.0):
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------------------
# Same update as torch.optim.AdamW


def test_matches_torch_adamw_bit_for_bit_on_cpu():
    ref, mine = _params(), _params()
    ro, mo = _torch_adamw(ref), _paged(mine)
    _run(ro, ref, 6)
    _run(mo, mine, 6)
    _assert_same(ref, mine)
    assert not torch.equal(ref[0].detach(), _params()[0].detach())  # the parameters did move
    for r, m in zip(ref, mine):
        if r in ro.state:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(mo.state[m][key], ro.state[r][key], rtol=0, atol=0)
        else:
            assert m not in mo.state or not mo.state[m]


def test_parameters_without_grad_are_untouched():
    mine = _params()
    frozen = torch.randn(3, requires_grad=True)  # never gets a gradient
    before = frozen.detach().clone()
    opt = _paged(mine)
    opt.add_param_group({"params": [frozen], "weight_decay": 0.5})
    _run(opt, mine, 3)
    assert torch.equal(frozen.detach(), before)  # not even weight decay touches it
    assert not opt.state.get(frozen)
    assert float(opt.state[mine[1]]["step"]) == 1.0  # mine[1] had a gradient on step 0 only
    assert float(opt.state[mine[3]]["step"]) == 2.0  # steps 0 and 2
    for p in mine:
        p.grad = None
    weights = [p.detach().clone() for p in mine]
    opt.step()  # a step with no gradients at all changes nothing
    _assert_same(weights, mine)


def test_chunked_pipeline_matches_torch_adamw():
    ref, mine = _params(), _params()
    ro = _torch_adamw(ref)
    # 5 elements per chunk: the 35-element parameter spans 7 chunks, small ones share chunks
    mo = _paged(mine, gpu_budget_bytes=5 * BYTES_PER_ELEMENT)
    mo._chunk_cpu_params = True
    _run(ro, ref, 5)
    _run(mo, mine, 5)
    _assert_same(ref, mine, atol=1e-6)
    with_grad = sum(p.numel() for p, g in zip(mine, _grads(mine, 4)) if g is not None)
    assert mo.last_step["chunks"] == math.ceil(with_grad / 5)
    assert mo.last_step["bytes_to_gpu"] == mo.last_step["bytes_to_host"] == 8 * with_grad


def test_16bit_weights_use_fp32_moments_and_round_once_per_step():
    """Reference: torch AdamW on an fp32 copy, the weight rounded to bf16 after every step."""
    mine = _params(dtype=torch.bfloat16)
    ref = [p.detach().float().requires_grad_() for p in mine]
    ro, mo = _torch_adamw(ref), _paged(mine)
    for t in range(4):
        for r, m, g in zip(ref, mine, _grads(mine, t)):
            m.grad = None if g is None else g.clone()
            r.grad = None if g is None else g.float()
        ro.step()
        mo.step()
        with torch.no_grad():
            for r in ref:
                r.copy_(r.bfloat16().float())
    _assert_same([r.bfloat16() for r in ref], mine)
    assert all(s["exp_avg"].dtype == torch.float32 for s in mo.state.values() if s)


def test_adamw_update_matches_torch_functional_step():
    g = torch.Generator().manual_seed(3)
    w, grad = torch.randn(50, generator=g), torch.randn(50, generator=g)
    m, v = torch.zeros(50), torch.zeros(50)
    ref = w.clone().requires_grad_()
    opt = torch.optim.AdamW([ref], lr=0.1, betas=(0.5, 0.9), eps=1e-3, weight_decay=0.2, foreach=False)
    for step in (1.0, 2.0, 3.0):
        ref.grad = grad.clone()
        opt.step()
        adamw_update_(w, grad, m, v, step=step, lr=0.1, beta1=0.5, beta2=0.9, eps=1e-3, weight_decay=0.2)
    assert torch.equal(w, ref.detach())
    assert torch.equal(m, opt.state[ref]["exp_avg"]) and torch.equal(v, opt.state[ref]["exp_avg_sq"])


# ---------------------------------------------------------------------------------------------------------
# Chunk plans


@pytest.mark.parametrize("numels, chunk", [([35, 13, 9, 24, 0], 5), ([1, 1, 1], 10), ([100], 7), ([0, 0], 3)])
def test_plan_chunks_covers_every_element_once_in_order(numels, chunk):
    chunks = plan_chunks(numels, chunk)
    assert len(chunks) == math.ceil(sum(numels) / chunk)
    seen = {i: 0 for i in range(len(numels))}
    for c in chunks:
        offset = 0
        for pc in c:
            assert pc.offset == offset and pc.length > 0
            assert pc.start == seen[pc.index]  # pieces of one parameter follow each other
            seen[pc.index] = pc.stop
            offset += pc.length
        assert offset <= chunk
    assert [seen[i] for i in range(len(numels))] == numels
    assert all(sum(pc.length for pc in c) == chunk for c in chunks[:-1])


def test_plan_chunks_splits_a_parameter_larger_than_a_chunk():
    assert plan_chunks([7, 2], 3) == [[Piece(0, 0, 3, 0)], [Piece(0, 3, 6, 0)], [Piece(0, 6, 7, 0), Piece(1, 0, 2, 1)]]
    with pytest.raises(ValueError, match="chunk_elements"):
        plan_chunks([3], 0)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def test_resume_from_state_dict_equals_uninterrupted_run():
    straight = _params()
    so = _paged(straight)
    _run(so, straight, 6)

    first = _params()
    fo = _paged(first)
    _run(fo, first, 3)
    saved = copy.deepcopy(fo.state_dict())
    weights = [p.detach().clone() for p in first]
    _run(fo, first, 2, start=3)  # training goes on after the save; the copy must not follow

    resumed = [w.clone().requires_grad_() for w in weights]
    ro = _paged(resumed)
    ro.load_state_dict(saved)
    _run(ro, resumed, 3, start=3)
    _assert_same(straight, resumed)

    # control: without the optimizer state the same three steps land elsewhere
    fresh = [w.clone().requires_grad_() for w in weights]
    _run(_paged(fresh), fresh, 3, start=3)
    assert not torch.equal(fresh[0].detach(), straight[0].detach())


def test_loaded_state_is_a_copy():
    a = _params()
    opt = _paged(a)
    _run(opt, a, 2)
    sd = copy.deepcopy(opt.state_dict())
    b = _params()
    other = _paged(b)
    other.load_state_dict(sd)
    before = sd["state"][0]["exp_avg"].clone()
    _run(other, b, 1, start=2)
    assert torch.equal(sd["state"][0]["exp_avg"], before)


def test_state_dict_has_torch_adamw_layout_and_loads_into_it():
    mine = _params()
    mo = _paged(mine)
    _run(mo, mine, 3)
    sd = copy.deepcopy(mo.state_dict())
    for i, entry in sd["state"].items():
        assert set(entry) == {"step", "exp_avg", "exp_avg_sq"}
        assert entry["exp_avg"].shape == mine[i].shape and entry["exp_avg"].dtype == torch.float32
        assert entry["step"].dtype == torch.float32 and entry["step"].ndim == 0

    # PagedAdamW for 3 steps, torch for 3 more == torch for 6
    ref = _params()
    _run(_torch_adamw(ref), ref, 6)
    handed = [p.detach().clone().requires_grad_() for p in mine]
    to = _torch_adamw(handed)
    to.load_state_dict(sd)
    _run(to, handed, 3, start=3)
    _assert_same(ref, handed)


def test_loads_a_torch_adamw_state_dict():
    ref = _params()
    ro = _torch_adamw(ref)
    _run(ro, ref, 3)
    sd = copy.deepcopy(ro.state_dict())
    mine = [p.detach().clone().requires_grad_() for p in ref]
    mo = _paged(mine)
    mo.load_state_dict(sd)
    _run(ro, ref, 3, start=3)
    _run(mo, mine, 3, start=3)
    _assert_same(ref, mine)


def test_deepcopy_keeps_budget_and_state_and_goes_on_alike():
    a = _params()
    opt = _paged(a, gpu_budget_bytes=7 * BYTES_PER_ELEMENT)
    _run(opt, a, 2)
    b, twin = copy.deepcopy((a, opt))  # one memo: the copy's groups and state refer to the copied parameters
    assert twin.gpu_budget_bytes == opt.gpu_budget_bytes and twin.chunk_elements == 7
    assert twin.param_groups[0]["params"][0] is b[0] and b[0] in twin.state
    _run(opt, a, 2, start=2)
    _run(twin, b, 2, start=2)
    _assert_same(a, b)


def test_lr_scheduler_drives_it_like_torch_adamw():
    ref, mine = _params(), _params()
    ro, mo = _torch_adamw(ref), _paged(mine)
    rs = torch.optim.lr_scheduler.StepLR(ro, step_size=2, gamma=0.3)
    ms = torch.optim.lr_scheduler.StepLR(mo, step_size=2, gamma=0.3)
    for t in range(5):
        _run(ro, ref, 1, start=t)
        _run(mo, mine, 1, start=t)
        rs.step()
        ms.step()
    assert [g["lr"] for g in mo.param_groups] == [g["lr"] for g in ro.param_groups]
    _assert_same(ref, mine)


def test_bad_state_dicts_are_rejected_and_change_nothing():
    mine = _params()
    opt = _paged(mine)
    _run(opt, mine, 2)
    good = copy.deepcopy(opt.state_dict())
    before = copy.deepcopy(opt.state_dict())

    fewer = copy.deepcopy(good)
    fewer["param_groups"] = fewer["param_groups"][:2]
    with pytest.raises(ValueError, match="parameter groups"):
        opt.load_state_dict(fewer)
    shape = copy.deepcopy(good)
    shape["state"][0]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(shape)
    ams = copy.deepcopy(good)
    ams["param_groups"][1]["amsgrad"] = True
    with pytest.raises(ValueError, match="amsgrad"):
        opt.load_state_dict(ams)
    missing = copy.deepcopy(good)
    del missing["state"][0]["exp_avg_sq"]
    with pytest.raises(ValueError, match="keys"):
        opt.load_state_dict(missing)

    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k in before["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(after["state"][k][key], before["state"][k][key])


# ---------------------------------------------------------------------------------------------------------
# CPU fallback, bad input, report


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_warns_exactly_once_without_cuda():
    mine = _params()
    opt = _paged(mine)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # Python would otherwise hide repeats for us
        _run(opt, mine, 3)
    msgs = [str(w.message) for w in caught]
    assert msgs.count("no CUDA: PagedAdamW runs as plain AdamW on the CPU") == 1, msgs
    assert caught[0].filename == __file__  # points at the caller's opt.step()


def test_cpu_parameters_warn_once_per_optimizer():
    a = _params()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = _paged(a)
        _run(opt, a, 2)
        _run(_paged(a), a, 2)
    assert sum("runs as plain AdamW on the CPU" in str(w.message) for w in caught) == 2


@pytest.mark.parametrize("kw, match", [
    ({"lr": -1e-3}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"betas": (1.0, 0.999)}, r"betas\[0\]"),
    ({"betas": (-0.1, 0.999)}, r"betas\[0\]"),
    ({"betas": (0.9, 1.0)}, r"betas\[1\]"),
    ({"eps": 0.0}, "eps"),
    ({"eps": -1e-8}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"gpu_budget_bytes": 0}, "gpu_budget_bytes"),
    ({"gpu_budget_bytes": -5}, "gpu_budget_bytes"),
    ({"gpu_budget_bytes": BYTES_PER_ELEMENT - 1}, "gpu_budget_bytes"),
    ({"amsgrad": True}, "amsgrad"),
    ({"maximize": True}, "maximize"),
])
def test_bad_settings_raise_value_error(kw, match):
    with pytest.raises(ValueError, match=match):
        PagedAdamW([torch.zeros(2, requires_grad=True)], **kw)


def test_bad_types_and_group_overrides():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(TypeError, match="gpu_budget_bytes"):
        PagedAdamW([p], gpu_budget_bytes=1.5e6)
    with pytest.raises(TypeError, match="betas"):
        PagedAdamW([p], betas=0.9)
    with pytest.raises(TypeError, match="float32"):
        PagedAdamW([torch.zeros(2, dtype=torch.float64, requires_grad=True)])
    opt = PagedAdamW([p])
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "lr": -1})
    assert len(opt.param_groups) == 1  # the bad group left nothing behind


def test_sparse_gradients_are_refused_before_any_change():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    dense = torch.zeros(3, requires_grad=True)
    opt = PagedAdamW([dense, *emb.parameters()])
    dense.grad = torch.ones(3)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert torch.equal(dense.detach(), torch.zeros(3))
    assert not opt.state.get(dense)


def test_closure_and_memory_report():
    mine = _params()
    opt = _paged(mine)

    def closure():
        opt.zero_grad()
        loss = sum((p.float() ** 2).sum() for p in mine)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and loss.item() > 0
    report = opt.memory_report()
    numel = sum(p.numel() for p in mine)
    assert report.host_state_bytes == 2 * 4 * numel  # m and v, fp32, every parameter had a gradient
    assert report.host_pinned_bytes == 0 and report.gpu_peak_bytes == 0  # CPU parameters: nothing paged
    assert report.chunk_elements == opt.gpu_budget_bytes // BYTES_PER_ELEMENT
    assert "state on host" in str(report)


# ---------------------------------------------------------------------------------------------------------
# CUDA: the streamed version


@pytest.mark.cuda
@pytest.mark.parametrize("budget_elements", [5, 64, 10_000])
def test_cuda_matches_torch_adamw_and_keeps_state_pinned(budget_elements):
    ref, mine = _params("cuda"), _params("cuda")
    ro = _torch_adamw(ref)
    mo = _paged(mine, gpu_budget_bytes=budget_elements * BYTES_PER_ELEMENT)
    _run(ro, ref, 5)
    _run(mo, mine, 5)
    _assert_same(ref, mine, atol=1e-6)
    for r, m in zip(ref, mine):
        if r in ro.state and r.numel():  # (an empty tensor has no memory to pin)
            assert mo.state[m]["exp_avg"].device.type == "cpu" and mo.state[m]["exp_avg"].is_pinned()
            torch.testing.assert_close(mo.state[m]["exp_avg_sq"], ro.state[r]["exp_avg_sq"].cpu(), rtol=0, atol=1e-9)
    report = mo.memory_report()
    assert report.host_pinned_bytes == report.host_state_bytes > 0
    assert 0 < report.gpu_peak_bytes <= mo.gpu_budget_bytes


@pytest.mark.cuda
def test_cuda_bf16_many_chunks_and_resume():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8))
    model = model.to("cuda", torch.bfloat16)
    twin = copy.deepcopy(model)
    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)

    def train(m, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            m(x).float().pow(2).mean().backward()
            opt.step()

    opt = PagedAdamW(model.parameters(), lr=1e-3, gpu_budget_bytes=1000 * BYTES_PER_ELEMENT)
    train(model, opt, 4)
    other = PagedAdamW(twin.parameters(), lr=1e-3, gpu_budget_bytes=1000 * BYTES_PER_ELEMENT)
    train(twin, other, 2)
    saved = copy.deepcopy(other.state_dict())
    resumed = PagedAdamW(twin.parameters(), lr=1e-3, gpu_budget_bytes=10**6)  # a different chunking
    resumed.load_state_dict(saved)
    train(twin, resumed, 2)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert opt.last_step["chunks"] > 10


# ---------------------------------------------------------------------------------------------------------
# The step inside backward


def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(24, 300), torch.nn.GELU(), torch.nn.Linear(300, 20)).to(dtype)


def _loss(model, t, scale=1.0):
    g = torch.Generator().manual_seed(100 + t)
    x, y = torch.randn(8, 24, generator=g), torch.randn(8, 20, generator=g)
    return (model(x).float() - y).pow(2).mean() * scale


@pytest.mark.parametrize("chunked", [False, True])
def test_step_in_backward_equals_torch_adamw_and_frees_every_gradient(chunked):
    ref, mine = _mlp(), _mlp()
    ro = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    mo = PagedAdamW(mine.parameters(), lr=1e-2, weight_decay=0.1, step_in_backward=True,
                    gpu_budget_bytes=1000 * BYTES_PER_ELEMENT)
    mo._chunk_cpu_params = chunked  # the slot ring, prefetch and resync, run synchronously on the CPU
    seen = []
    mine[2].weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad is not None))
    for t in range(4):
        _loss(ref, t).backward()
        ro.step()
        ro.zero_grad()
        _loss(mine, t).backward()
        mo.step()  # does nothing: the updates ran in backward
        assert all(p.grad is None for p in mine.parameters())
    _assert_same(list(ref.parameters()), list(mine.parameters()))
    if chunked:  # the 7,200-element weight spans several 1,000-element chunks
        assert mo.last_step["chunks"] == sum(math.ceil(p.numel() / 1000) for p in mine.parameters())


def test_step_in_backward_accumulates_then_updates_on_the_last_micro_batch():
    ref, mine = _mlp(), _mlp()
    ro = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    mo = PagedAdamW(mine.parameters(), lr=1e-2, step_in_backward=True, accumulation_steps=3)
    for step in range(2):
        for micro in range(3):
            _loss(ref, 3 * step + micro, scale=1 / 3).backward()
            _loss(mine, 3 * step + micro, scale=1 / 3).backward()
            if micro < 2:  # between micro-batches the gradients live, as with any optimizer
                assert all(p.grad is not None for p in mine.parameters())
        ro.step()
        ro.zero_grad()
        assert all(p.grad is None for p in mine.parameters())
    _assert_same(list(ref.parameters()), list(mine.parameters()), atol=1e-7)


def test_step_in_backward_refuses_global_clipping_and_step_clips_like_torch():
    with pytest.raises(ValueError, match="global gradient norm.*step_in_backward"):
        PagedAdamW(_mlp().parameters(), step_in_backward=True, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="accumulation_steps"):
        PagedAdamW(_mlp().parameters(), accumulation_steps=2)
    ref, mine = _mlp(), _mlp()
    ro = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    mo = PagedAdamW(mine.parameters(), lr=1e-2, max_grad_norm=0.05)
    for t in range(3):
        _loss(ref, t).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        assert norm > 0.05  # clipping did something
        ro.step()
        ro.zero_grad()
        _loss(mine, t).backward()
        mo.step()
        mo.zero_grad()
    _assert_same(list(ref.parameters()), list(mine.parameters()))


def test_step_in_backward_resume_is_exact_and_hooks_can_be_removed():
    straight = _mlp()
    so = PagedAdamW(straight.parameters(), lr=1e-2, step_in_backward=True)
    for t in range(5):
        _loss(straight, t).backward()
    part = _mlp()
    po = PagedAdamW(part.parameters(), lr=1e-2, step_in_backward=True)
    for t in range(2):
        _loss(part, t).backward()
    saved = copy.deepcopy(po.state_dict())
    po.remove_hooks()
    _loss(part, 2).backward()
    assert all(p.grad is not None for p in part.parameters())  # no hook, no update
    resumed = copy.deepcopy(part)
    for p in resumed.parameters():
        p.grad = None
    with torch.no_grad():
        for p, q in zip(resumed.parameters(), po.param_groups[0]["params"]):
            p.copy_(q)
    ro = PagedAdamW(resumed.parameters(), lr=1e-2, step_in_backward=True)
    ro.load_state_dict(saved)
    for t in range(2, 5):
        _loss(resumed, t).backward()
    _assert_same(list(straight.parameters()), list(resumed.parameters()))
    assert so.last_step["bytes_to_host"] == 0  # CPU parameters: nothing paged


# ---------------------------------------------------------------------------------------------------------
# 8-bit state: bitsandbytes' scheme


def _bnb_adamw8bit(params, **kw):
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.optim.AdamW8bit(params, **kw)


def test_8bit_state_matches_bitsandbytes_adamw8bit_on_cpu(eager_bitsandbytes):
    """Same update within a stated tolerance, same state bytes. bitsandbytes' CPU kernel updates m as
    β1·m + (1-β1)·g where torch lerps, so a code can round the other way: weights agree to 1e-4 (0.1 lr) after 5 steps
    at lr 1e-3 (an update of 1e-3 per step), the dequantized moments to a few map steps."""
    ref, mine = _mlp(), _mlp()
    bo = _bnb_adamw8bit(ref.parameters(), lr=1e-3, weight_decay=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mo = PagedAdamW(mine.parameters(), lr=1e-3, weight_decay=0.01, state_bits=8)
        for t in range(5):
            for m, o in ((ref, bo), (mine, mo)):
                _loss(m, t).backward()
                o.step()
                o.zero_grad()
    for r, m in zip(ref.parameters(), mine.parameters()):
        torch.testing.assert_close(m, r, rtol=0, atol=1e-4)  # a tenth of one step (lr 1e-3)
        bs, ms = bo.state[r], mo.state[m]
        if r.numel() >= 4096:
            assert ms["exp_avg"].dtype == bs["state1"].dtype == torch.uint8
            assert (ms["exp_avg"].int() - bs["state1"].int()).abs().max() <= 2
            torch.testing.assert_close(ms["exp_avg_sq_absmax"], bs["absmax2"], rtol=1e-5, atol=0)
        else:  # small parameters keep fp32 state in both
            assert ms["exp_avg"].dtype == bs["state1"].dtype == torch.float32
    mine_bytes = sum(t.nbytes for s in mo.state.values() for k, t in s.items() if k != "step")
    bnb_bytes = sum(s[k].nbytes for s in bo.state.values() for k in ("state1", "state2", "absmax1", "absmax2")
                    if k in s)
    assert mine_bytes == bnb_bytes


@pytest.mark.parametrize("chunked", [False, True])
def test_8bit_state_resume_is_exact_and_close_to_fp32(chunked):
    def train(model, opt, steps, start=0):
        for t in range(start, start + steps):
            _loss(model, t).backward()
            opt.step()
            opt.zero_grad()

    def make(model):
        opt = PagedAdamW(model.parameters(), lr=1e-3, state_bits=8, gpu_budget_bytes=4 * 256 * 45)
        opt._chunk_cpu_params = chunked
        return opt

    straight = _mlp()
    train(straight, make(straight), 6)
    part = _mlp()
    po = make(part)
    train(part, po, 3)
    saved = copy.deepcopy(po.state_dict())
    assert set(saved["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"}
    resumed = copy.deepcopy(part)
    ro = make(resumed)
    ro.load_state_dict(saved)
    train(resumed, ro, 3, start=3)
    _assert_same(list(straight.parameters()), list(resumed.parameters()))
    fp32 = _mlp()
    train(fp32, PagedAdamW(fp32.parameters(), lr=1e-3), 6)
    moved = max((a - b).abs().max().item() for a, b in zip(fp32.parameters(), _mlp().parameters()))
    off = max((a - b).abs().max().item() for a, b in zip(fp32.parameters(), straight.parameters()))
    assert off < 0.1 * moved  # 8-bit moments: the same training, to ~6% of what it moved after 6 steps
    with pytest.raises(ValueError, match="8-bit and 32-bit"):
        PagedAdamW(fp32.parameters()).load_state_dict(saved)


def test_refuses_torch_checkpoint_keys_that_change_the_math():
    ref = _params()
    ro = _torch_adamw(ref)
    _run(ro, ref, 1)
    sd = copy.deepcopy(ro.state_dict())
    mo = _paged(_params())
    mo.load_state_dict(copy.deepcopy(sd))  # foreach / fused / capturable only pick a kernel: accepted
    assert "foreach" not in mo.param_groups[0] and "decoupled_weight_decay" not in mo.param_groups[0]
    for key, value, match in [("decoupled_weight_decay", False, "L2"), ("differentiable", True, "differentiable"),
                              ("nesterov", True, "does not know")]:
        bad = copy.deepcopy(sd)
        bad["param_groups"][0][key] = value
        with pytest.raises(ValueError, match=match):
            mo.load_state_dict(bad)
    adam = torch.optim.Adam(_groups(_params()), lr=1e-2, weight_decay=0.1)
    with pytest.raises(ValueError, match="decoupled_weight_decay"):
        mo.load_state_dict(adam.state_dict())


def test_pinned_reserved_bytes_rounds_to_powers_of_two():
    from minilora.paged import pinned_reserved_bytes
    assert pinned_reserved_bytes(5632 * 2048 * 4) == 64 * 2**20  # a TinyLlama MLP moment: 44 MiB -> 64 MiB
    assert pinned_reserved_bytes(2**20) == 2**20 and pinned_reserved_bytes(0) == 0


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [32, 8])
def test_cuda_step_in_backward_matches_the_cpu_and_resumes_exactly(bits):
    cpu, gpu = _mlp(), _mlp().cuda()
    kw = dict(lr=1e-2, state_bits=bits, step_in_backward=True, gpu_budget_bytes=300 * 256 * 46, slots=4)
    co, go = PagedAdamW(cpu.parameters(), **kw), PagedAdamW(gpu.parameters(), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(3):
            _loss(cpu, t).backward()
            g = torch.Generator().manual_seed(100 + t)
            x, y = torch.randn(8, 24, generator=g).cuda(), torch.randn(8, 20, generator=g).cuda()
            (gpu(x) - y).pow(2).mean().backward()
    # fp32 state: the same arithmetic. 8-bit state: a moment that lands on a rounding boundary may take the
    # neighbouring code on one device (float32 sums in another order), and its weight moves by up to a tenth of
    # a step (lr 1e-2) more or less: measured on an H100, 1 of 7,200 weights 6.9e-5 apart after 3 steps
    atol = 1e-5 if bits == 32 else 1e-3
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(b.cpu(), a, rtol=0, atol=atol)
        if bits == 8:
            assert (b.cpu() - a).abs().gt(1e-5).float().mean() < 0.01  # boundary cases only: under 1% of weights
    sd = go.state_dict()
    assert all(t.is_pinned() for s in go.state.values() for k, t in s.items() if k != "step" and t.numel())
    twin = copy.deepcopy(gpu)
    to = PagedAdamW(twin.parameters(), **kw)
    to.load_state_dict(sd)
    for m in (gpu, twin):
        (m(torch.ones(8, 24, device="cuda")) ** 2).mean().backward()
    for a, b in zip(gpu.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("chunked", [False, True])
def test_8bit_tiny_v_is_never_stored_as_zero(chunked):
    """An embedding row with a tiny gradient, then none: v must not round to 0, or m/(sqrt(v)+eps) divides
    by eps alone (the nearest-entry rule stores v/absmax = 1e-8 as 0; the grid rule as ~1.5e-5)."""
    emb = torch.nn.Embedding(300, 64)
    opt = PagedAdamW(emb.parameters(), lr=1e-3, weight_decay=0.0, state_bits=8, gpu_budget_bytes=4 * 256 * 46)
    opt._chunk_cpu_params = chunked
    grad = torch.zeros(300, 64)
    grad[0], grad[1] = 1.0, 1e-4  # rows 0 and 1 share a block of 256 values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(3):
            before = emb.weight.detach().clone()
            emb.weight.grad = grad.clone()
            opt.step()
            assert (emb.weight.detach() - before).abs().max() < 10 * 1e-3, t  # Adam moves by ~lr per step
            grad[1] = 0.0  # row 1 is not in the later batches
    assert opt.state[emb.weight]["exp_avg_sq"][1].min() > 0  # a nonzero code
