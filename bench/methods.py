"""Chapter 12's methods on a GPU: training step time and memory, inference latency; LoRA, AdaLoRA, adapters, prefixes.

    python -m bench.methods --out bench/results/methods_gpu.json        # on a GPU: MiniLM and BERT-base shapes
    python -m bench.methods --shape tiny --warmup 1 --steps 2 --repeats 3   # a CPU check of this script

A BERT classifier (`BertForSequenceClassification`, two labels) of MiniLM-L6's configuration (hidden 384, 6
layers) and of BERT-base's (768, 12 layers), with RANDOM weights: time and memory do not depend on the
values, and the GPU machine has no model packages. bf16 on a GPU (float32 on a CPU), sdpa attention, dropout
as configured (0.1), every method in every layer with chapter 12's settings: LoRA r = 8, alpha = 16 on the six
linear maps of each layer; AdaLoRA r0 = 12 -> 8, alpha = 32, timed in its pruning phase (scores every step, a
pruning every 2nd); bottleneck adapters of 32 after the attention output and the MLP; 10 prefix tokens per
layer. Every method trains the classification head too; "head only" trains nothing else (the floor), "full FT"
trains everything. AdamW (fused on CUDA), moments in the parameters' dtype.

Training: batch x seq random tokens, forward, loss (AdaLoRA adds its orthogonality penalty), backward, step
(AdaLoRA then scores and prunes). After warm-up, `repeats` windows of `steps` steps: per window the median
GPU time per step (CUDA events) and host time per step (until the step is issued, no sync); the figure is the
median over windows with their min-max. Peak = torch.cuda.max_memory_allocated over the timed windows;
`static_mib` = what was allocated before the first step (weights).

Inference (`torch.inference_mode`, eval): the whole model at batch 1 and a large batch, same timing rule, the
variants taking turns window by window (a busy moment hits all alike): base; LoRA merged (merge_and_unload of
a LoRA model with a nonzero B: checked against the unmerged outputs, the base model's module types); LoRA
unmerged (minilora's LoRALinear: on CUDA the fused forward of chapter 10 where it applies); AdaLoRA
unmerged; adapters (no merged form); 10 prefixes (every attention reads 10 more keys and values, and the
prefixes take 10 of the model's positions); base at seq + 10 tokens (the same attention length, for
comparison). Peak memory of each variant at the large batch is taken in a pass of its own.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
from typing import Any, Callable

import torch
from torch import nn

from bench.steps import _sync, _window, summarize

SHAPES = {  # BERT configurations; "tiny" checks this script on a CPU in seconds
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                   vocab_size=30522, max_position_embeddings=512),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      vocab_size=30522, max_position_embeddings=512),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 vocab_size=256, max_position_embeddings=128),
}
# chapter 12's settings (course/12_beyond_lora.ipynb, §2)
TARGETS = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
           r"intermediate\.dense|output\.dense)")
ADAPTER_AFTER = r".*encoder\.layer\.\d+\.(attention\.output\.dense|output\.dense)"
R, ALPHA, BOTTLENECK, PREFIX = 8, 16, 32, 10
TRAIN_METHODS = ("head only", "full FT", "LoRA", "AdaLoRA", "adapters", "prefix")
VARIANTS = ("base", "LoRA merged", "LoRA unmerged", "AdaLoRA unmerged", "adapters", "prefix (10 tokens)",
            f"base (seq + {PREFIX} tokens)")


def build_bert(shape: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    """A BERT classifier of `shape` with RANDOM weights (fp32 init, seed fixed), cast to `dtype` on `device`."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(**SHAPES[shape], num_labels=2, attn_implementation="sdpa")
    return BertForSequenceClassification(config).to(device=device, dtype=dtype)


def ada_config(total_step: int):
    """AdaLoRA as chapter 12 sets it, with a schedule that prunes throughout the `total_step` steps timed."""
    from minilora.adalora import AdaLoRAConfig

    return AdaLoRAConfig(target_modules=TARGETS, init_r=12, target_r=8, lora_alpha=32, total_step=total_step,
                         tinit=0, tfinal=0, deltaT=2)


def with_method(model: nn.Module, method: str, total_step: int = 1000) -> nn.Module:
    """`model` with `method`'s trainable parameters (the head trainable in every method); may wrap it."""
    from minilora.adalora import inject_adalora
    from minilora.adapters import PrefixTuning, insert_adapters
    from minilora.inject import inject

    if method in ("full FT",):
        return model.requires_grad_(True)
    if method in ("head only", "base"):
        model.requires_grad_(False)
    elif method.startswith("LoRA"):
        inject(model, TARGETS, r=R, lora_alpha=ALPHA)
    elif method.startswith("AdaLoRA"):
        inject_adalora(model, ada_config(total_step))
    elif method == "adapters":
        insert_adapters(model, ADAPTER_AFTER, bottleneck=BOTTLENECK)
    elif method.startswith("prefix"):
        model = PrefixTuning(model, num_virtual_tokens=PREFIX)
    else:
        raise ValueError(f"unknown method {method!r}")
    head = model.model.classifier if method.startswith("prefix") else model.classifier
    head.requires_grad_(True)
    return model


def _inputs(shape: str, batch: int, seq: int, device: torch.device, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (batch, seq), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": torch.randint(0, 2, (batch,), generator=g).to(device)}


def _mib(device: torch.device, what: Callable[[torch.device], int]) -> float | None:
    return what(device) / 2**20 if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------------------
# Training steps


def train_record(method: str, shape: str, batch: int, seq: int, warmup: int, steps: int, repeats: int,
                 dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """Time `repeats` windows of `steps` training steps of one method; trainable numbers and peak memory."""
    from minilora.adalora import RankAllocator, with_orthogonal_penalty

    total = 1 + warmup + steps * repeats
    model = with_method(build_bert(shape, dtype, device), method, total_step=total + 1).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=device.type == "cuda")
    config = ada_config(total + 1) if method == "AdaLoRA" else None
    allocator = RankAllocator(model, config) if config else None
    x = _inputs(shape, batch, seq, device)
    count = [0]

    def step() -> None:
        loss = model(**x).loss
        if config:
            loss = with_orthogonal_penalty(loss, model, config)
        loss.backward()
        opt.step()
        count[0] += 1
        if allocator:
            allocator.update_and_allocate(count[0])
        opt.zero_grad(set_to_none=True)

    _sync(device)
    static = _mib(device, torch.cuda.memory_allocated)
    step()  # builds the optimizer state
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    windows = [_window(step, steps, device) for _ in range(repeats)]
    record = {"shape": shape, "method": method, "batch": batch, "seq": seq, "steps": steps,
              "trainable": sum(p.numel() for p in params),
              "total_params": sum(p.numel() for p in model.parameters()),
              "static_mib": static, "peak_mib": _mib(device, torch.cuda.max_memory_allocated), "windows": windows}
    record.update(summarize(record))
    return record


# ---------------------------------------------------------------------------------------------------------
# Inference


def inference_models(shape: str, dtype: torch.dtype, device: torch.device) -> tuple[dict[str, nn.Module], float]:
    """The variants (eval mode), and the largest |merged - unmerged| logit of LoRA on a test batch."""
    from minilora.inject import lora_layers, merge_and_unload

    base = build_bert(shape, dtype, device).eval()
    lora = with_method(copy.deepcopy(base), "LoRA")
    torch.manual_seed(2)
    for _, layer in lora_layers(lora):
        nn.init.normal_(layer.lora_B["default"], std=0.02)  # a trained-looking update: merging changes weights
    x = {k: v[:4] for k, v in _inputs(shape, 4, 16, device).items() if k != "labels"}
    with torch.no_grad():
        unmerged = lora.eval()(**x).logits.float()
        merged = merge_and_unload(copy.deepcopy(lora)).eval()
        gap = (merged(**x).logits.float() - unmerged).abs().max().item()
    if [type(m) for m in merged.modules()] != [type(m) for m in base.modules()]:
        raise AssertionError("merge_and_unload left modules that the base model does not have")
    models = {"base": base, "LoRA merged": merged, "LoRA unmerged": lora,
              "AdaLoRA unmerged": with_method(copy.deepcopy(base), "AdaLoRA"),
              "adapters": with_method(copy.deepcopy(base), "adapters"),
              "prefix (10 tokens)": with_method(copy.deepcopy(base), "prefix"),
              f"base (seq + {PREFIX} tokens)": base}
    for m in models.values():
        m.eval()
    return models, gap


def inference_records(shape: str, batch: int, seq: int, warmup: int, iters: int, repeats: int,
                      dtype: torch.dtype, device: torch.device) -> list[dict[str, Any]]:
    """Latency of every variant at (batch, seq), taking turns window by window; then each one's peak memory."""
    models, gap = inference_models(shape, dtype, device)
    x = {k: v for k, v in _inputs(shape, batch, seq, device).items() if k != "labels"}
    longer = {k: v for k, v in _inputs(shape, batch, seq + PREFIX, device).items() if k != "labels"}
    calls = {name: (lambda m=m, inp=(longer if name.startswith("base (seq") else x): m(**inp))
             for name, m in models.items()}
    windows: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in calls.values():
                fn()
        for _ in range(repeats):
            for name, fn in calls.items():
                windows[name].append(_window(fn, iters, device))
        peaks = {}
        for name, fn in calls.items():
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            fn()
            _sync(device)
            peaks[name] = _mib(device, torch.cuda.max_memory_allocated)
    records = []
    for name in models:
        n_train = sum(p.numel() for p in models[name].parameters()) - sum(p.numel() for p in models["base"].parameters())
        record = {"shape": shape, "variant": name, "batch": batch,
                  "seq": seq + PREFIX if name.startswith("base (seq") else seq, "iters": iters,
                  "extra_params": n_train, "peak_mib": peaks[name], "windows": windows[name]}
        record.update(summarize(record))
        records.append(record)
    positions = SHAPES[shape]["max_position_embeddings"]
    for r in records:
        if r["variant"].startswith("prefix"):
            r["positions_left"] = positions - PREFIX  # of the model's positions, what the input may still use
        if r["variant"] == "LoRA merged":
            r["merged_vs_unmerged_max_abs"] = gap
    return records


# ---------------------------------------------------------------------------------------------------------
# The table and the driver


def _ratio_table(records: list[dict[str, Any]], key: str, group: tuple[str, ...], ref: str) -> str:
    """One line per record: median [min-max] GPU ms, host ms, the ratio to `ref` of its group, peak MiB."""
    refs = {tuple(r[g] for g in group): r for r in records if r[key] == ref and "gpu_ms" in r}
    lines = [f"{'':<24}{'GPU ms [min-max]':>26}{'host ms':>10}{'vs ' + ref:>14}{'peak MiB':>10}{'trainable':>12}"]
    for r in records:
        if "error" in r:
            lines.append(f"{r[key]:<24}  FAILED: {r['error'][:150]}")
            continue
        base = refs.get(tuple(r[g] for g in group))
        ratio = f"{r['gpu_ms'] / base['gpu_ms']:.2f}x" if base else "-"
        peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "-"
        n = r.get("trainable", r.get("extra_params"))
        lines.append(f"{r[key]:<24}{r['gpu_ms']:>10.3f} [{r['gpu_ms_min']:.3f}-{r['gpu_ms_max']:.3f}]"
                     f"{r['host_ms']:>10.3f}{ratio:>14}{peak:>10}{n:>12,}")
    return "\n".join(lines)


def _guarded(fn: Callable[[], Any], label: dict[str, Any]) -> Any:
    """Run one configuration; a failure becomes a record with its error, and the run goes on."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - one failed configuration must not lose the others
        return [{**label, "error": f"{type(err).__name__}: {err}"[:600]}] if label.get("many") else \
            {**label, "error": f"{type(err).__name__}: {err}"[:600]}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _pairs(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        b, _, s = item.strip().partition("x")
        if not (b.isdigit() and s.isdigit()) or int(b) < 1 or int(s) < 1:
            raise SystemExit(f"expected batch x seq like 32x128, got {item!r}")
        out.append((int(b), int(s)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="minilm,bert-base", help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--train", default="32x128", help="training batch x seq, comma-separated")
    ap.add_argument("--infer", default="1x128,64x128", help="inference batch x seq, comma-separated")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on a CPU")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="steps (or forward calls) per timing window")
    ap.add_argument("--repeats", type=int, default=5, help="timing windows (>= 3 for a spread)")
    ap.add_argument("--out", help="JSON file for the records (written atomically)")
    args = ap.parse_args(argv)
    shapes = [s.strip() for s in args.shape.split(",")]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}; choose from {sorted(SHAPES)}")
    if args.repeats < 1 or args.steps < 1 or args.warmup < 0:
        raise SystemExit("--repeats and --steps must be >= 1, --warmup >= 0")
    train_shapes, infer_shapes = _pairs(args.train), _pairs(args.infer)

    from minilora.profiling import environment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype] or \
        (torch.bfloat16 if device.type == "cuda" else torch.float32)
    env = environment(device)
    train, infer = [], []
    for shape in shapes:
        for batch, seq in train_shapes:
            for method in TRAIN_METHODS:
                label = {"shape": shape, "method": method, "batch": batch, "seq": seq}
                train.append(_guarded(lambda: train_record(method, shape, batch, seq, args.warmup, args.steps,
                                                           args.repeats, dtype, device), label))
                print(f"train {shape} {method} {batch}x{seq}: {train[-1].get('gpu_ms', train[-1].get('error'))}",
                      flush=True)
        for batch, seq in infer_shapes:
            label = {"shape": shape, "variant": "all", "batch": batch, "seq": seq, "many": True}
            infer += _guarded(lambda: inference_records(shape, batch, seq, args.warmup, args.steps, args.repeats,
                                                        dtype, device), label)
            print(f"inference {shape} {batch}x{seq}: done", flush=True)
    text = []
    for shape in shapes:
        for batch, seq in train_shapes:
            rows = [r for r in train if (r["shape"], r["batch"], r["seq"]) == (shape, batch, seq)]
            text.append(f"training step, {shape}, batch {batch} x {seq}\n" + _ratio_table(rows, "method", ("shape",), "head only"))
        for batch, seq in infer_shapes:
            rows = [r for r in infer if r["shape"] == shape and r["batch"] == batch and r.get("seq") in (seq, seq + PREFIX)]
            text.append(f"inference, {shape}, batch {batch} x {seq}\n" + _ratio_table(rows, "variant", ("shape", "batch"), "base"))
    table = "\n\n".join(text)
    print(f"{env}\n{dtype}, median of {args.repeats} windows of {args.steps} [min-max]\n\n{table}")
    if args.out:
        record = {"note": __doc__.split("\n\n", 1)[1].strip(), "date": env.date, "device": env.device_name,
                  "torch": env.torch, "dtype": str(dtype), "environment": dataclasses.asdict(env),
                  "settings": vars(args), "train": train, "inference": infer, "table": table}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1, default=str)
            f.write("\n")
        os.replace(tmp, args.out)
    failed = [r for r in train + infer if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
