"""Run minilora on several CPU processes: the launcher chapter 13 and its tests use, and a torchrun script.

`run_on_ranks(fn, world_size, *args)` starts `world_size` fresh Python processes (spawn), joins them into
one gloo process group over localhost, calls `fn(rank, world_size, *args)` in each and returns the results
in rank order. `fn` must be importable (a module's top-level function: the processes are new
interpreters, they cannot see a notebook's cells).

As a script it trains a small random-weight Llama with LoRA or QLoRA under DDP or FSDP2 on whatever
processes `torchrun` starts (gloo on CPUs, NCCL on GPUs, one GPU per process):

    torchrun --standalone --nproc-per-node 2 -m minilora.course.launch --mode fsdp --qlora --steps 20

Every rank prints its loss and what it holds; rank 0 writes the adapter (`--out`, PEFT's format).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "run_on_ranks", "tiny_llama", "batches", "train_steps", "every_word_layer", "gather_check",
           "SETUPS", "measure_setups", "adapter_round_trip", "chapter13", "main"]


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago (for the process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, queue: Any, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # N processes share the machine's cores
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - sent to the parent, which raises it
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(fn: Callable[..., Any], world_size: int = 2, *args: Any, timeout: float = 300.0,
                 may_exit: tuple[int, ...] = ()) -> list[Any]:
    """fn(rank, world_size, *args) on `world_size` new CPU processes in one gloo group; results by rank.

    Raises RuntimeError with the rank's traceback if `fn` raised there, or if a rank sent nothing in time,
    except the ranks in `may_exit` (a test that kills a rank on purpose): their result is None.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()  # no feeder thread: a put is in the pipe when it returns
    port = free_port()
    procs = [ctx.Process(target=_child, args=(rank, world_size, port, queue, fn, args), daemon=True)
             for rank in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size and time.monotonic() < deadline:
        if queue.empty():
            if not any(p.is_alive() for p in procs) and queue.empty():
                break
            time.sleep(0.05)
            continue
        rank, ok, payload = queue.get()
        if ok:
            results[rank] = payload
        else:
            errors.append(f"rank {rank}:\n{payload}")
    for p in procs:
        p.join(timeout=min(10.0, max(1.0, deadline - time.monotonic())))  # results are in: exit is quick
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError("a rank raised:\n" + "\n".join(errors))
    missing = [r for r in range(world_size) if r not in results and r not in may_exit]
    if missing:
        raise RuntimeError(f"ranks {missing} sent no result (exit codes {[p.exitcode for p in procs]})")
    return [results.get(r) for r in range(world_size)]


# ---------------------------------------------------------------------------------------------------------
# A small model and a few steps, shared by the chapter, its tests and the torchrun script


def tiny_llama(qlora: bool = True, use_dora: bool = False, hidden: int = 64, layers: int = 2, vocab: int = 128,
               r: int | None = 4, seed: int = 0) -> torch.nn.Module:
    """A random-weight Llama (hidden, 2·hidden MLP, 4 heads, 2 KV heads), NF4 base if `qlora`, rank-r
    adapters on every projection (B random too, so that every adapter gets a gradient at once); r=None:
    no adapters, every parameter trains (full fine-tuning). Seeded: every rank builds the same model."""
    import minilora
    from minilora.memory import LORA_TARGETS, LlamaShape, build_llama

    model = build_llama(LlamaShape(hidden, 2 * hidden, layers, 4, 2, vocab), seed=seed)
    if r is None:
        return model
    if qlora:
        minilora.quantize_model(model)
    minilora.inject(model, target_modules=list(LORA_TARGETS), r=r, lora_alpha=2 * r, use_dora=use_dora,
                    init_lora_weights=False)
    return model


def batches(steps: int, batch: int = 4, seq: int = 16, vocab: int = 128, seed: int = 100) -> list[torch.Tensor]:
    """The global batches of token ids, the same on every rank: (batch, seq) int64 each."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(steps)]


def train_steps(model: torch.nn.Module, rank: int, world_size: int, steps: int = 3, lr: float = 1e-2,
                vocab: int = 128, after_backward: Callable[[Any], None] | None = None) -> tuple[list[float], Any]:
    """AdamW steps on rank `rank`'s equal slice of each global batch; returns (this rank's losses, optimizer).

    With equal slices the mean of the ranks' losses is the whole batch's loss, and the averaged gradient is
    the whole batch's gradient: N ranks take the step one process takes on the whole batch.
    `after_backward(optimizer)` runs after each backward, while the gradients are there.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    device = next(iter(params)).device
    losses = []
    for ids in batches(steps, vocab=vocab):
        ids = ids.chunk(world_size)[rank].to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if after_backward is not None:
            after_backward(optimizer)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, optimizer


# ---------------------------------------------------------------------------------------------------------
# What chapter 13 measures on its ranks


def every_word_layer(size: int = 512) -> torch.nn.Module:
    """One LoRA layer on a (size, size) NF4 base whose packed codes hold every 16-bit pattern (as pairs of
    bytes) once, so also every float16 and bfloat16 NaN: (size²/2) bytes, size ≥ 512 for all 65,536."""
    import minilora
    from minilora.qlora import LinearNF4

    torch.manual_seed(0)
    base = LinearNF4.from_linear(torch.nn.Linear(size, size, bias=False))
    words = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.uint8)
    n = base.weight_packed.numel()
    base.weight_packed.copy_(words.repeat(-(-n // words.numel()))[:n])
    return torch.nn.Sequential(minilora.LoRALinear(base, r=4, init_lora_weights=False))


def gather_check(rank: int, world_size: int) -> dict[str, Any]:
    """Shard `every_word_layer` with FSDP2, all-gather it, and compare the bytes with the original."""
    from minilora import distributed as D

    model = every_word_layer()
    original = model[0].base_layer.weight_packed.clone()
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(1))
    expected = model(x)
    D.shard_model(model, blocks=[])
    shard = model[0].base_layer.weight_packed
    counter = D.CommCounter()
    with counter.watch():
        y = model(x)
        model.unshard()  # FSDP2's own all-gather; the gathered tensors stay until reshard()
    gathered = model[0].base_layer.weight_packed.detach().clone()
    model.reshard()
    return {
        "nan_float16": int(torch.isnan(original.view(torch.float16)).sum()),
        "nan_bfloat16": int(torch.isnan(original.view(torch.bfloat16)).sum()),
        "bit_equal": torch.equal(gathered, original),
        "shard_bytes": shard.to_local().nbytes,
        "total_bytes": original.nbytes,
        "forward_equal": torch.equal(y, expected),
        "all_gather_dtypes": sorted(str(d).replace("torch.", "") for d in counter.dtypes["all_gather"]),
    }


# (name, wrapper, tiny_llama arguments): the layouts chapter 13 compares
SETUPS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("DDP, full fine-tuning", "ddp", {"r": None}),
    ("FSDP2, full fine-tuning", "fsdp", {"r": None}),
    ("DDP, LoRA", "ddp", {"qlora": False}),
    ("FSDP2, LoRA", "fsdp", {"qlora": False}),
    ("DDP, QLoRA", "ddp", {"qlora": True}),
    ("FSDP2, QLoRA, 4-bit weight as buffers", "fsdp-buffers", {"qlora": True}),
    ("FSDP2, QLoRA", "fsdp", {"qlora": True}),
)


def _wrapped(model: torch.nn.Module, how: str) -> tuple[torch.nn.Module, Any]:
    from torch.distributed.fsdp import fully_shard

    from minilora import distributed as D

    counter = D.CommCounter()
    if how == "ddp":
        ddp = D.wrap_ddp(model)
        counter.attach(ddp)
        return ddp, counter
    if how == "fsdp-buffers":  # fully_shard as it comes: LinearNF4's buffers are not sharded
        for block in model.model.layers:
            fully_shard(block)
        return fully_shard(model), counter
    return D.shard_model(model), counter


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def first_step_grads(model: torch.nn.Module, into: dict[str, torch.Tensor]) -> Callable[[Any], None]:
    """An `after_backward` for `train_steps` that copies the trainable gradients of the first step into `into`,
    whole (under FSDP2 each rank holds a shard, gathered here, on every rank: call it on all of them).

    The step's gradient is where a wrong reduction shows: averaged over ranks it equals the whole batch's
    gradient, summed it is `world_size` times that. Adam's step hardly sees that factor (it divides by √v).
    """
    from minilora import distributed as D

    def record(optimizer: Any) -> None:
        if into:
            return
        for name, p in D.unwrap(model).named_parameters():
            if p.requires_grad:
                into[name] = _whole(p.grad).detach().clone()
    return record


def measure_setups(rank: int, world_size: int, steps: int = 2, **shape: Any) -> dict[str, Any]:
    """For each of SETUPS: train `steps` steps on this rank and on one process, and report per rank
    what it holds after the last backward (`held_bytes`), what it sent per step (`CommCounter`), the
    ranks' mean loss, the largest difference of the first step's averaged gradients from the whole batch's
    (and the largest gradient value, its scale) and of any trainable parameter from the one-process run."""
    from minilora import distributed as D

    out = {}
    for name, how, kwargs in SETUPS:
        one = tiny_llama(**kwargs, **shape)
        one_held: dict[str, int] = {}
        one_grads: dict[str, torch.Tensor] = {}
        one_first = first_step_grads(one, one_grads)
        one_losses, _ = train_steps(one, 0, 1, steps=steps, vocab=one.config.vocab_size,
                                    after_backward=lambda opt: (one_held.update(D.held_bytes(one, opt)),
                                                                one_first(opt)))
        model, counter = _wrapped(tiny_llama(**kwargs, **shape), how)
        held: dict[str, int] = {}
        grads: dict[str, torch.Tensor] = {}
        first = first_step_grads(model, grads)
        with counter.watch():
            losses, _ = train_steps(model, rank, world_size, steps=steps, vocab=one.config.vocab_size,
                                    after_backward=lambda opt: (held.update(D.held_bytes(model, opt)), first(opt)))
        mean = torch.tensor(losses)
        dist.all_reduce(mean)
        params = dict(D.unwrap(model).named_parameters())
        diff = max((_whole(params[n]).detach() - p.detach()).abs().max().item()
                   for n, p in one.named_parameters() if p.requires_grad)
        out[name] = {"held": held, "held_one_process": one_held, "sent_per_step": {k: v // steps for k, v in
                     counter.bytes.items()}, "loss": (mean / world_size).tolist(), "loss_one_process": one_losses,
                     "max_param_diff": diff,
                     "max_grad_diff": max((grads[n] - g).abs().max().item() for n, g in one_grads.items()),
                     "grad_scale": max(g.abs().max().item() for g in one_grads.values())}
    return out


def adapter_round_trip(rank: int, world_size: int, directory: str, **shape: Any) -> dict[str, Any]:
    """Save the adapter of a trained FSDP2 + QLoRA model, load it into a fresh sharded model, compare."""
    from minilora import distributed as D
    from minilora import io as adapter_io

    model = D.shard_model(tiny_llama(**shape))
    train_steps(model, rank, world_size, steps=1, vocab=model.config.vocab_size)
    saved = D.save_adapter(model, directory)
    with D.gathered_adapters(model) as whole:
        trained = adapter_io.adapter_state_dict(whole)
    fresh = D.shard_model(tiny_llama(**shape, seed=1))
    D.load_adapter(fresh, saved)
    with D.gathered_adapters(fresh) as whole:
        loaded = adapter_io.adapter_state_dict(whole)
    return {"tensors": len(trained), "bytes": sum(t.nbytes for t in trained.values()),
            "loaded_equal": all(torch.equal(loaded[k], trained[k]) for k in trained)}


def chapter13(rank: int, world_size: int, directory: str, **shape: Any) -> dict[str, Any]:
    """Everything chapter 13 measures on its ranks, in one launch (each launch costs seconds of imports),
    and the rank's peak resident memory (MiB, from the kernel's count for this process)."""
    import resource

    out = {"setups": measure_setups(rank, world_size, **shape), "gather": gather_check(rank, world_size),
           "round_trip": adapter_round_trip(rank, world_size, directory, **shape)}
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes
    return out


# ---------------------------------------------------------------------------------------------------------
# The torchrun script


def main(argv: list[str] | None = None) -> None:
    """Train under torchrun (see the module docstring): `python -m minilora.course.launch --help`."""
    from minilora import distributed as D

    parser = argparse.ArgumentParser(description="Train a small minilora model on the processes torchrun starts.")
    parser.add_argument("--mode", choices=("ddp", "fsdp"), default="fsdp")
    parser.add_argument("--qlora", action="store_true", help="NF4 base (QLoRA); default: float32 base (LoRA)")
    parser.add_argument("--dora", action="store_true", help="DoRA adapters instead of LoRA")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", default=None, help="directory to save the adapter to (PEFT format)")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        parser.error("run me under torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        model = tiny_llama(qlora=args.qlora, use_dora=args.dora, hidden=args.hidden, layers=args.layers)
        if cuda:
            model = model.cuda()
        model = D.shard_model(model) if args.mode == "fsdp" else D.wrap_ddp(model)
        losses, optimizer = train_steps(model, rank, world, steps=args.steps)
        held = D.held_bytes(model, optimizer)
        # one write per line: the ranks share the terminal, and print() writes the newline separately
        sys.stdout.write(f"rank {rank}/{world} {args.mode}: holds {held['total']:,} bytes (4-bit base "
                         f"{held['base_4bit']:,}, adapters {held['adapters']:,})\n")
        sys.stdout.flush()
        mean = torch.tensor([losses[0], losses[-1]], device=next(model.parameters()).device)
        dist.all_reduce(mean)  # the whole batch's loss: the mean of the ranks' (equal slices)
        if rank == 0:
            print(f"loss over the ranks' batches: step 1 {mean[0].item() / world:.4f}, step {args.steps} "
                  f"{mean[1].item() / world:.4f}", flush=True)
        if args.out:
            D.save_adapter(model, args.out)
            if rank == 0:
                print(f"adapter saved to {args.out}", flush=True)
        # every rank reaches here before any tears its group down: a rank that exits while another is still
        # writing closes the connections under that rank's gloo threads, which then abort its process
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
