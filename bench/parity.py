"""Model-level parity on the device: each of minilora's code paths trains the same model as its readable layer
and as PEFT + bitsandbytes.

    python -m bench.parity --shape 8B-2 --steps 40 --seeds 3 --out bench/results/parity_gpu.json   # on a GPU
    python -m bench.parity --shape tiny --steps 10                                                  # a CPU check of it

The unit tests hold every fused path to the readable layer on a CPU, where two of its parts never run:
the Triton kernels that build W' = deq(W) + s·B A from the 4-bit codes, and cuBLAS's products of 16-bit
operands written straight into float32 (`torch.addmm(..., out_dtype=torch.float32)`) that give the float32
adapters their gradients. Here each path, switched on one at a time, trains one model (random weights and
adapters) on one fixed batch with AdamW; with `--seeds K` all of it again for seeds 0..K-1 (weights,
adapters and batch drawn anew, the same for every path within a seed), so that a difference between paths
can be told from a difference between draws. The record says, per path and seed:

* `grads`: the adapters' gradients of the first two steps (the first has dL/dA = 0, since B starts at zero),
  each path's largest relative difference from the readable layer's, tensor by tensor;
* `losses`: the loss before every update, beside PEFT + bitsandbytes' on the same model and batch;
* `probe`: the float32-output product alone against float32 arithmetic, with a non-zero first argument
  (which `beta=0` must ignore).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Any, Iterator

import torch
from torch import nn

from bench.steps import SHAPES, adapt, build_model

# 8B-2: two layers of the 8B shape (its widths, its vocabulary); 256-2: two narrow layers, for a CPU
PARITY_SHAPES = dict(SHAPES, **{"8B-2": dataclasses.replace(SHAPES["8B"], layers=2),
                                "256-2": dataclasses.replace(SHAPES["8B"], hidden=256, intermediate=896, layers=2,
                                                             heads=4, kv_heads=2, vocab=2048)})
PATHS = ("readable", "fused", "fused/torch-build", "fused/no-f32-out", "fused/unmerged", "peft")
# more paths: "readable/float32", the same model and adapters in float32 (no 16-bit rounding anywhere: the
# trajectory the others approximate); "fused/one-rounding", on a CPU, the PyTorch build rounded once, as the
# Triton kernel rounds (deq(W) + s·B A in float32, then to bf16), where the PyTorch build rounds deq(W) first


@contextlib.contextmanager
def path_switches(path: str, device: torch.device) -> Iterator[None]:
    """minilora.fast's module settings for one path, restored afterwards."""
    from minilora import fast

    saved = (fast.USE_TRITON_BUILD, fast.MERGE_CROSSOVER, fast.MERGE_CROSSOVER_FREE_BUILD,
             dict(fast._OUT_DTYPE_OK))
    stack = contextlib.ExitStack()
    try:
        if path == "fused/torch-build":
            fast.USE_TRITON_BUILD = False
        if path == "fused/no-f32-out":
            fast._OUT_DTYPE_OK[device] = False
        if path == "fused/unmerged":
            fast.MERGE_CROSSOVER = fast.MERGE_CROSSOVER_FREE_BUILD = float("inf")
        if path == "fused/one-rounding" and device.type != "cuda":
            stack.enter_context(one_rounding_build())
        yield
    finally:
        stack.close()
        fast.USE_TRITON_BUILD, fast.MERGE_CROSSOVER, fast.MERGE_CROSSOVER_FREE_BUILD = saved[:3]
        fast._OUT_DTYPE_OK.clear()
        fast._OUT_DTYPE_OK.update(saved[3])


@contextlib.contextmanager
def one_rounding_build() -> Iterator[None]:
    """The fused layers' W' for an NF4 base built as the Triton kernel builds it, on any device: deq(W) + s·B A
    in float32, rounded to the compute dtype once; eagerly and inside the operators compiled code calls
    (`kernels.ops`). A stand-in for the kernel where there is no GPU (here, and in tests/test_compile.py)."""
    from minilora import fast, kernels
    from minilora.kernels import ops
    from minilora.nf4 import dequantize_nf4

    def build(q, A, B, scaling, dtype, row_scale=None):
        w = dequantize_nf4(q, torch.float32).addmm_(B.float(), A.float(), alpha=scaling)
        return (w if row_scale is None else w * row_scale.float().unsqueeze(1)).to(dtype)

    def row_norm(q, A, B, scaling):  # DoRA's ‖deq(W) + s·B A‖ per row, in float32 as the kernel sums it
        return torch.linalg.vector_norm(build(q, A, B, scaling, torch.float32), dim=1)

    names = ("nf4_lora_weight", "nf4_lora_row_norm")
    saved = (fast._triton_build, kernels.nf4_lora_weight_triton, kernels.nf4_lora_row_norm_triton,
             *(ops._EAGER[n] for n in names))
    fast._triton_build = lambda weight, dtype, rank: isinstance(weight, fast.NF4Tensor)
    kernels.nf4_lora_weight_triton = ops._EAGER["nf4_lora_weight"] = build
    kernels.nf4_lora_row_norm_triton = ops._EAGER["nf4_lora_row_norm"] = row_norm
    try:
        yield
    finally:
        fast._triton_build, kernels.nf4_lora_weight_triton, kernels.nf4_lora_row_norm_triton = saved[:3]
        ops._EAGER.update(zip(names, saved[3:]))


def train(path: str, base: str, shape: str, batch: int, seq: int, steps: int, lr: float,
          device: torch.device, seed: int = 0) -> dict[str, Any]:
    """One path: the model of `seed` adapted, `steps` AdamW steps on one batch; the losses and the first two
    steps' adapter gradients (float32, on the host)."""
    from minilora.lora import LoRALinear

    with path_switches(path, device):
        if path == "readable/float32":
            model = float32_model(shape, seq, base, device, seed)
        else:
            model = build_model_for(shape, seq, device, seed)
            model = adapt(model, ("peft-" if path == "peft" else "") + base).train()
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.fused = not path.startswith("readable")
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        opt = torch.optim.AdamW(params.values(), lr=lr, fused=device.type == "cuda")
        ids = torch.randint(0, PARITY_SHAPES[shape].vocab, (batch, seq), device=device,
                            generator=torch.Generator(device).manual_seed(1 + seed))
        losses, grads = [], []
        for step in range(steps):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(float(loss.detach()))
            if step < 2:
                grads.append({_key(n): p.grad.detach().float().cpu() for n, p in params.items()})
            opt.step()
            opt.zero_grad(set_to_none=True)
    del model, opt
    return {"losses": losses, "grads": grads}


def build_model_for(shape: str, seq: int, device: torch.device, seed: int = 0) -> nn.Module:
    """bench.steps' random-weight bf16 Llama (weights drawn from `seed`), for the shapes of this module too."""
    if shape in SHAPES:
        return build_model(shape, seq, device, seed)
    from minilora.memory import build_llama

    model = build_llama(PARITY_SHAPES[shape], torch.float32, device, seed=seed,
                        max_position_embeddings=max(seq, 128), attn_implementation="sdpa")
    return model.to(torch.bfloat16)


def float32_model(shape: str, seq: int, base: str, device: torch.device, seed: int = 0) -> nn.Module:
    """The model of `adapt(build_model_for(...), base)` kept in float32: weights, 4-bit compute dtype, adapters."""
    from bench.common import ALPHA, R
    from bench.steps import TARGETS
    from minilora.inject import inject
    from minilora.memory import build_llama
    from minilora.qlora import quantize_model

    model = build_llama(PARITY_SHAPES[shape], torch.float32, device, seed=seed, max_position_embeddings=max(seq, 128),
                        attn_implementation="sdpa")
    if base == "qlora":
        quantize_model(model, blocksize=64, double_quant=True, compute_dtype=torch.float32)
    inject(model, target_modules=TARGETS, r=R, lora_alpha=ALPHA)
    return model.train()


def _key(name: str) -> str:
    """A parameter's name without PEFT's wrappers (base_model.model. ... .weight), as minilora names it."""
    return name.removeprefix("base_model.model.").removesuffix(".weight")


def differences(grads: list[dict[str, torch.Tensor]], ref: list[dict[str, torch.Tensor]]) -> list[dict[str, Any]]:
    """Per step: the largest ‖g − g_ref‖ / ‖g_ref‖ over the tensors, and which tensor (where g_ref is zero,
    the norm of g itself, flagged)."""
    out = []
    for got, want in zip(grads, ref):
        worst = {"rel": 0.0, "name": None, "ref_zero": False}
        for name, g in want.items():
            denom = float(g.norm())
            err = float((got[name] - g).norm()) / (denom if denom > 0 else 1.0)
            if err > worst["rel"]:
                worst = {"rel": err, "name": name, "ref_zero": denom == 0}
        out.append(worst)
    return out


def _compared(grads: list[dict[str, torch.Tensor]], ref: list[dict[str, torch.Tensor]]) -> list[dict[str, Any]] | None:
    """`differences`, or None where the parameters are not the same set (PEFT names some otherwise)."""
    return differences(grads, ref) if grads and ref and set(grads[0]) == set(ref[0]) else None


def probe(device: torch.device) -> dict[str, Any] | None:
    """torch.addmm with out_dtype=float32 from bf16 operands, beta=0 and a non-zero first argument, against
    s·(m1 m2) in float32: its relative error (float32 accumulation of exact bf16 products: ~1e-6)."""
    from minilora import fast

    if not fast._out_dtype_ok(device):
        return None
    g = torch.Generator(device).manual_seed(0)
    like = torch.randn(16, 4096, device=device, generator=g)
    m1 = torch.randn(16, 2048, device=device, generator=g).bfloat16()
    m2 = torch.randn(2048, 4096, device=device, generator=g).bfloat16()
    got = torch.addmm(like, m1, m2, beta=0, alpha=2.0, out_dtype=torch.float32)
    want = 2.0 * (m1.double() @ m2.double())
    return {"rel_err": float((got.double() - want).norm() / want.norm()),
            "first_argument_over_product": float(like.norm() / want.norm())}  # the error if beta were not 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=sorted(PARITY_SHAPES))
    ap.add_argument("--base", default="qlora", choices=("qlora", "lora"))
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seeds", type=int, default=1, help="train every path from seeds 0..SEEDS-1")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")
    from minilora.profiling import environment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    paths = [p.strip() for p in args.paths.split(",")]
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
    for seed in range(args.seeds):
        for p in paths:
            runs[p].append(train(p, args.base, args.shape, args.batch, args.seq, args.steps, args.lr, device, seed))
            print(f"  seed {seed} {p}: loss {runs[p][-1]['losses'][0]:.4f} -> {runs[p][-1]['losses'][-1]:.4f}",
                  flush=True)
    ref = runs.get("readable")
    record = {"environment": env.__dict__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "settings": vars(args), "probe": probe(device), "paths": {}}
    for p, seeds in runs.items():
        # per seed; PEFT draws its A otherwise: its gradients are not comparable, its losses are
        record["paths"][p] = {"losses": [run["losses"] for run in seeds],
                              "grads": [_compared(run["grads"], want["grads"]) if ref and p not in ("readable", "peft")
                                        else None for run, want in zip(seeds, ref or seeds)]}
    print(f"{env}\n{args.base} at the {args.shape} shape, batch {args.batch} x {args.seq}, AdamW lr {args.lr}, "
          f"{args.steps} steps on one batch, seed{f's 0-{args.seeds - 1}' if args.seeds > 1 else ' 0'}; "
          f"probe: {record['probe']}")
    for p, r in record["paths"].items():
        fell = [losses[0] - losses[-1] for losses in r["losses"]]
        g = r["grads"][0]
        print(f"  {p:20s} loss fell by {min(fell):.4f}-{max(fell):.4f}"
              + ("" if not g else "  seed 0's grads vs readable: " + ", ".join(
                  f"step {i + 1} {d['rel']:.2e} ({d['name']}{', ref 0' if d['ref_zero'] else ''})"
                  for i, d in enumerate(g))))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
