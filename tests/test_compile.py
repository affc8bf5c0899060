"""torch.compile over minilora models: whole graphs (fullgraph=True, no graph break), results equal to eager.

The fused layers (`minilora.fast`) and the readable QLoRA layer pass their NF4 base through
`autograd.Function.apply` and call the kernels through `torch.ops.minilora` operators while compiling
(`minilora.kernels.ops`): dynamo would otherwise stop at the dataclass or trace into Python it cannot follow.
On a CPU the operators run the chapters' PyTorch code and inductor compiles the rest to C++; a GPU run of
the same models with CUDA graphs is in the benchmark (`python -m bench --sections steps`).
"""

import shutil

import pytest
import torch
from torch import nn

from helpers import small_llama
from minilora.inject import inject
from minilora.qlora import quantize_model

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                                 reason="inductor needs a C++ compiler on a CPU")]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def model_of(kind: str, fused: bool) -> nn.Module:
    torch.manual_seed(0)
    model = Block()
    if kind.startswith("q"):
        quantize_model(model, double_quant=True, compute_dtype=torch.float32)
    inject(model, target_modules=["up", "down"], r=4, lora_alpha=8, use_dora=kind.endswith("dora"), fused=fused,
           init_lora_weights=False)  # B ≠ 0: the adapters change the output
    return model


def forward_backward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    for p in model.parameters():
        p.grad = None
    y = model(x)
    y.square().sum().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("kind, fused", [("lora", True), ("dora", True), ("qlora", True), ("qdora", True),
                                         ("qlora", False), ("qdora", False)], ids=str)
def test_compiles_whole_and_matches_eager(kind, fused):
    from torch._dynamo.utils import counters

    model = model_of(kind, fused)
    x = torch.randn(2, 8, 64)
    y_ref, grads_ref = forward_backward(model, x)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True)  # raises at the first graph break
    y, grads = forward_backward(compiled, x)
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert len(grads) == len(grads_ref) and grads
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("base", ["dense", "nf4"])
@pytest.mark.parametrize("path", ["merged", "unmerged"])
def test_no_scaled_addmm_reaches_inductor(path, base):
    """The fused layer's graphs, forward and backward, hold no addmm with alpha or beta: compiled on CUDA
    (torch 2.11) such forms gave the adapters zero gradients where eager's were not (chapter 10's compile
    check; bench/NOTES.md, call AD); inductor rewrites addmm into mm + add in places and has dropped the
    scalars there before (pytorch/pytorch#167313). `fast._addmm` scales while compiling; eager it stays one
    addmm."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from minilora.fast import lora_linear, qlora_linear
    from minilora.nf4 import quantize_nf4

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch.manual_seed(0)
    w = torch.randn(96, 64)
    weight, layer = (w, lora_linear) if base == "dense" else (quantize_nf4(w, double_quant=True), qlora_linear)
    x = torch.randn(16, 64, requires_grad=True)
    A, B = torch.randn(4, 64, requires_grad=True), torch.randn(96, 4, requires_grad=True)

    def step(x, A, B):
        return layer(x, weight, None, A, B, 2.0, path).relu().sum()  # a pointwise use after the layer

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=keep, bw_compiler=keep)  # keeps the graphs inductor would get
    torch.compile(step, backend=backend, fullgraph=True)(x, A, B).backward()
    addmms = [n for g in graphs for n in g.graph.nodes if n.target is torch.ops.aten.addmm.default]
    scaled = [n for n in addmms if n.kwargs.get("alpha", 1) != 1 or n.kwargs.get("beta", 1) != 1
              or len(n.args) > 3]
    assert len(graphs) == 2 and not scaled, [n.format_node() for n in scaled]


@pytest.mark.cuda
@pytest.mark.parametrize("checkpointing", [None, "non-reentrant"])
def test_compile_layers_computes_eager_gradients_on_cuda(checkpointing):
    """On CUDA the small Llama's layers take the fused path; compiled with `compile_layers`, its float32 step
    computes eager's loss and adapter gradients. This is the configuration in which the addmm forms with alpha
    and beta gave every adapter a zero gradient (an H200, torch 2.11; bench/NOTES.md, call AD), which
    test_no_scaled_addmm_reaches_inductor guards on a CPU."""
    from minilora.fast import compile_layers

    eager, compiled = small_llama(checkpointing, device="cuda"), small_llama(checkpointing, device="cuda")
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    compile_layers(compiled)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1)).cuda()
    losses = [m(input_ids=ids, labels=ids).loss for m in (eager, compiled)]
    for loss in losses:
        loss.backward()
    assert float(losses[1]) == pytest.approx(float(losses[0]), rel=1e-5)
    grads = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    assert len(grads) == 3 * 4 * 2
    for n, p in compiled.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-5 * float(grads[n].abs().max()))


def test_the_nf4_operator_equals_the_chapter_function():
    from minilora import kernels
    from minilora.nf4 import dequantize_nf4, quantize_nf4

    q = quantize_nf4(torch.randn(48, 96), double_quant=True)
    parts, (shape, dtype, blocksize, scale_blocksize) = kernels.ops.nf4_parts(q)
    out = torch.ops.minilora.nf4_dequantize(*parts, list(shape), dtype, blocksize, scale_blocksize, torch.bfloat16)
    assert torch.equal(out, dequantize_nf4(q, torch.bfloat16))
    assert kernels.ops.nf4_from_parts(*parts, (shape, dtype, blocksize, scale_blocksize)) == q


@pytest.mark.parametrize("double_quant", [False, True])
def test_operators_rebuild_the_weight_they_were_given_and_refuse_parts_that_disagree(double_quant, monkeypatch):
    """The operators rebuild an NF4Tensor from its parts without rerunning its checks (host time): the same
    tensor when the parts fit; the dataclass's own error when a count or dtype does not."""
    import minilora.nf4
    from minilora import kernels
    from minilora.nf4 import quantize_nf4

    q = quantize_nf4(torch.randn(48, 128), double_quant=double_quant)
    parts, (shape, dtype, blocksize, scale_blocksize) = kernels.ops.nf4_parts(q)
    with monkeypatch.context() as m:  # parts that fit never reach the dataclass's checks
        m.setattr(minilora.nf4, "_check_layout", lambda q: pytest.fail("the full checks ran"))
        assert kernels.ops._q(*parts, list(shape), dtype, blocksize, scale_blocksize) == q
    packed, scales, offset, absmax = parts
    with pytest.raises(ValueError, match="packed has 3071 bytes"):
        kernels.ops._q(packed[:-1], scales, offset, absmax, list(shape), dtype, blocksize, scale_blocksize)
    with pytest.raises(ValueError, match="96 values|has 95"):
        kernels.ops._q(packed, scales, offset, absmax[:-1], list(shape), dtype, blocksize, scale_blocksize)
    with pytest.raises(TypeError, match="packed must be a 1-D uint8"):
        kernels.ops._q(packed.to(torch.int16), scales, offset, absmax, list(shape), dtype, blocksize, scale_blocksize)
    if double_quant:
        with pytest.raises(TypeError, match="scales must be a 1-D"):
            kernels.ops._q(packed, None, offset, absmax, list(shape), dtype, blocksize, scale_blocksize)


def test_adapter_gradients_compile_where_cublas_writes_float32(monkeypatch):
    """16-bit compute with float32 masters: on CUDA the eager backward asks cuBLAS for float32 gradients
    (addmm's out_dtype); under compile that overload must stay out of the graph (it breaks it), and the
    gradients still come back in float32."""
    from torch._dynamo.utils import counters

    from minilora import fast

    torch.manual_seed(0)
    model = Block().to(torch.bfloat16)
    inject(model, target_modules=["up", "down"], r=4, lora_alpha=8, fused=True, init_lora_weights=False)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # float32 masters, as pack_adapters and mixed precision keep them
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16)
    y_ref, grads_ref = forward_backward(model, x)
    monkeypatch.setitem(fast._OUT_DTYPE_OK, x.device, True)  # as on a GPU whose cuBLAS takes out_dtype
    torch._dynamo.reset()
    counters.clear()
    y, grads = forward_backward(torch.compile(model, fullgraph=True), x)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert all(g.dtype == torch.float32 for g in grads)
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    for g, g_ref in zip(grads, grads_ref):  # bf16 products, rounded in another order while compiling (_addmm)
        torch.testing.assert_close(g, g_ref, rtol=2e-2, atol=1e-2 * float(g_ref.abs().max()))


@pytest.mark.parametrize("setup", ["compile without checkpointing", "compile", "offload, compile",
                                   "compile, offload", "compile, compile", "compile, offload, compile"])
def test_compile_layers_trains_as_eager(setup: str):
    """`compile_layers` compiles each decoder layer whole, in place (with its checkpoint where transformers'
    gradient checkpointing wraps it, before or after `offload_checkpoints`): the step computes what eager does
    (float32: only inductor's reassociation separates them), with one graph for all the layers (two without
    checkpointing, where the first layer's input needs no gradient); compiling again changes nothing, and a
    model so compiled is not compiled again whole."""
    from torch._dynamo.utils import counters

    from minilora.fast import compile_layers, compile_model, offload_checkpoints

    checkpointing = None if setup.endswith("without checkpointing") else "non-reentrant"
    eager, compiled = small_llama(checkpointing), small_llama(checkpointing)
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    offload = None
    for i, action in enumerate(setup.split(", ")):
        if action == "offload":
            offload = offload_checkpoints(compiled, min_bytes=1)
        elif i == 0 or "compile" not in setup.split(", ")[:i]:
            assert compile_layers(compiled) == 3
        else:  # compiled before: nothing changes
            wrapped = [layer._gradient_checkpointing_func for layer in compiled.model.layers]
            compile_layers(compiled)
            assert [layer._gradient_checkpointing_func for layer in compiled.model.layers] == wrapped
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    counters.clear()
    losses = [m(input_ids=ids, labels=ids).loss for m in (eager, compiled)]
    if offload is not None:  # the compiled layer also saves its weights: only each layer's input goes to the host
        held = [h for h in (ref() for ref in offload.order) if h is not None]
        # (the last layer's stays on the device: backward needs it first)
        assert [tuple((h.gpu if h.host is None else h.host).shape) for h in held] == [(2, 16, 64)] * 3
        assert [h.host is None for h in held] == [False, False, True]
    for loss in losses:
        loss.backward()
    graphs = 1 if checkpointing else 2
    assert counters["stats"]["unique_graphs"] == graphs and not counters["graph_break"], dict(counters["graph_break"])
    assert float(losses[1]) == pytest.approx(float(losses[0]), rel=1e-5)
    grads = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    assert len(grads) == 3 * 4 * 2
    for n, p in compiled.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-5 * float(grads[n].abs().max()))
    if setup == "compile":
        with pytest.raises(ValueError, match="compile_layers"):
            compile_model(compiled)


def test_compile_layers_recipe_with_guards_skipped():
    """The README's recipe: fuse_loss, compile_layers, offload_checkpoints, a step that compiles, then steps with
    dynamo's guards skipped; every step computes what eager does, and none compiles anew."""
    from torch._dynamo.utils import counters

    from minilora.fast import compile_layers, fuse_loss, offload_checkpoints

    eager, compiled = small_llama("non-reentrant"), small_llama("non-reentrant")
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    fuse_loss(compiled)
    compile_layers(compiled)
    offload_checkpoints(compiled)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (eager, compiled)]
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))

    def step(model, opt):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    assert step(compiled, opts[1]) == pytest.approx(step(eager, opts[0]), rel=1e-5)  # compiles
    graphs = counters["stats"]["unique_graphs"]
    with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
        for _ in range(2):
            assert step(compiled, opts[1]) == pytest.approx(step(eager, opts[0]), rel=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs


def test_compile_model_is_one_graph_under_checkpointing():
    """`compile_model`: a whole Llama with adapters under transformers' (non-reentrant) gradient checkpointing
    compiles into one graph, where plain `torch.compile` breaks at every layer, and trains as eager does; the
    reentrant kind is refused before anything changes."""
    from torch._dynamo.utils import counters

    from minilora.fast import compile_model, offload_checkpoints

    eager, model = small_llama(), small_llama()
    model.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    counters.clear()
    compiled = compile_model(model)
    losses = [m(input_ids=ids, labels=ids).loss for m in (eager, compiled)]
    for loss in losses:
        loss.backward()
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert float(losses[1]) == pytest.approx(float(losses[0]), rel=1e-5)
    grads = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-5 * float(grads[n].abs().max()))

    reentrant, offloaded = small_llama("reentrant"), small_llama()
    offload_checkpoints(offloaded)
    for bad, why in ((reentrant, "reentrant"), (offloaded, "offload")):
        with pytest.raises(ValueError, match=why):
            compile_model(bad)
        hooks = [h for m in bad.modules() for h in m._forward_hooks.values()]
        assert any(h.__name__ == "make_inputs_require_grads" for h in hooks), "refused, yet changed"


def test_compile_layers_needs_repeated_layers():
    from minilora.fast import compile_layers

    with pytest.raises(ValueError, match="repeated layers"):
        compile_layers(Block())


def test_compile_layers_refuses_reentrant_checkpointing():
    from minilora.fast import compile_layers

    model = small_llama("reentrant")
    before = [layer._gradient_checkpointing_func for layer in model.model.layers]
    with pytest.raises(ValueError, match="reentrant"):
        compile_layers(model)
    assert [layer._gradient_checkpointing_func for layer in model.model.layers] == before


def test_compile_layers_recomputes_only_what_backward_needs():
    """With the checkpoint inside the compiled call, backward recomputes in its own graph and skips what no
    gradient needs: the last projection's product with its base and with its B (its input and x Aᵀ are
    needed, for dL/dA and dL/dB). Counted against the same layer compiled inside an eager checkpoint, which
    runs the whole forward graph again: two matmuls fewer per layer and step, the same gradients."""
    from functools import partial

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from minilora import fast

    def matmuls(form: str) -> tuple[int, dict[str, torch.Tensor]]:
        counts = []

        def count(gm, example_inputs):  # the forward's graph runs twice under an eager checkpoint
            counts.append(sum(n.target == torch.ops.aten.mm.default for n in gm.graph.nodes))
            return make_boxed_func(gm.forward)

        model = small_llama()
        backend = aot_autograd(fw_compiler=count, bw_compiler=count)
        torch._dynamo.reset()
        if form == "compile_layers":
            fast.compile_layers(model, backend=backend)
        else:
            call = torch.compile(fast._call, backend=backend)
            for layer in model.model.layers:
                checkpoint = layer._gradient_checkpointing_func
                layer._gradient_checkpointing_func = \
                    lambda f, *a, _c=checkpoint, **kw: _c(partial(call, f), *a, **kw)
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
        model(input_ids=ids, labels=ids).loss.backward()
        forward, backward = counts
        per_layer = forward * (1 if form == "compile_layers" else 2) + backward
        return per_layer, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    traced, grads = matmuls("compile_layers")
    eager_checkpoint, grads_ref = matmuls("eager checkpoint")
    assert traced == eager_checkpoint - 2
    for n, g in grads_ref.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()))


def test_a_compiled_layer_call_checks_hundreds_of_guards():
    """What the README's `skip_guard_eval_unsafe` advice rests on: before each call of a compiled layer, dynamo
    checks a few hundred guards (the layer's module tree: its hooks, types, attributes), here counted on the
    small Llama's first layer with its checkpoint."""
    from minilora import fast

    model = small_llama()
    fast._trace_checkpoints()
    checkpoint, seen = model.model.layers[0]._gradient_checkpointing_func, []

    def spy(function, *args, **kwargs):  # the arguments transformers gives a layer's checkpoint
        seen.append((function, args, kwargs))
        return checkpoint(function, *args, **kwargs)

    model.model.layers[0]._gradient_checkpointing_func = spy
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids)
    function, args, kwargs = seen[0]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fast._call)(checkpoint, function, *args, **kwargs)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    assert 100 <= len(explained.out_guards) <= 2000, len(explained.out_guards)


@pytest.mark.parametrize("how", ["compile_layers", "compile_model"])
def test_compiled_checkpoints_rebuild_4bit_weights_in_backward(how: str):
    """A QLoRA layer compiled with its checkpoint keeps for backward what its eager checkpoint keeps, its input
    (and the 4-bit codes, which are buffers), and no weight built from the codes: backward dequantizes again.
    torch 2.11's partitioner kept every layer's dequantized weights (13 GiB at the 8B shape) unless the traced
    checkpoint's policy marks the operators that build them as recomputed (`fast._rebuild_weights_policy`)."""
    from minilora import fast
    from torch.utils.checkpoint import CheckpointPolicy

    assert fast._rebuild_weights_policy(None, torch.ops.minilora.nf4_dequantize.default) \
        == CheckpointPolicy.MUST_RECOMPUTE
    assert fast._rebuild_weights_policy(None, torch.ops.aten.mm.default) == CheckpointPolicy.PREFER_RECOMPUTE
    model = small_llama(layers=2, qlora=True)
    weights = {(64, 64), (32, 64), (128, 64), (64, 128)}  # (out, in) of the seven projections, all NF4
    torch._dynamo.reset()
    if how == "compile_layers":
        fast.compile_layers(model)
    else:
        model = fast.compile_model(model)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))  # 48 tokens: no (out, in)
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert saved and not weights & set(saved), saved


@pytest.mark.parametrize("dora", [False, True], ids=["qlora", "qdora"])
def test_compiled_layers_never_hold_a_built_weight(dora):
    """On a GPU a fused QLoRA layer builds W' = deq(q) + s·B A (QDoRA: c ⊙ that) with the Triton kernel.
    Compiled with its checkpoint, that build and the product with W' are one operator (`kernels.merged_matmul`):
    the graphs hold no W', so backward cannot build a layer's weights at its top and keep them all to their last
    use (416 MiB alive at once at the 8B shape, bench/NOTES.md, call Q). Here the Triton build is stood in for on
    the CPU by PyTorch rounding as the kernel rounds (`bench.parity.one_rounding_build`): per layer the forward
    runs one such operator per adapter, backward one per input gradient and one per output it recomputes (not
    the down projection's under LoRA), with eager's gradients."""
    from torch._inductor.utils import run_and_get_code

    from bench.parity import one_rounding_build
    from minilora import fast
    from minilora.lora import LoRALinear

    def step(compiled: bool) -> tuple[list[str], dict[str, torch.Tensor]]:
        model = small_llama(layers=2, qlora=True, dora=dora)
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.fused = True
        torch._dynamo.reset()
        if compiled:
            fast.compile_layers(model)
        ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
        codes = run_and_get_code(lambda: model(input_ids=ids, labels=ids).loss.backward())[1]
        return codes, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    with one_rounding_build():
        codes, grads = step(compiled=True)
        _, grads_ref = step(compiled=False)
    assert not any("minilora.nf4_lora_weight.default(" in c for c in codes)
    # q, v, gate, down adapted: 4 in the forward; backward: 4 input gradients + q, v, gate recomputed (DoRA's
    # magnitude gradient reads each layer's output, so there down's is recomputed too)
    assert [c.count("minilora.nf4_lora_matmul.default(") for c in codes[:2]] == [4, 8 if dora else 7]
    for n, g in grads_ref.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()))
