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
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "run_on_ranks", "tiny_llama", "train_steps", "main"]


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
               r: int = 4, seed: int = 0) -> torch.nn.Module:
    """A random-weight Llama (hidden, 2·hidden MLP, 4 heads, 2 KV heads), NF4 base if `qlora`, rank-r
    adapters on every projection (B random too, so that every adapter gets a gradient at once). Seeded:
    every rank builds the same model."""
    import minilora
    from minilora.memory import LORA_TARGETS, LlamaShape, build_llama

    model = build_llama(LlamaShape(hidden, 2 * hidden, layers, 4, 2, vocab), seed=seed)
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
                vocab: int = 128, on_step: Callable[[int], None] | None = None) -> tuple[list[float], Any]:
    """AdamW steps on rank `rank`'s equal slice of each global batch; returns (this rank's losses, optimizer).

    With equal slices the mean of the ranks' losses is the whole batch's loss, and the averaged gradient is
    the whole batch's gradient: N ranks take the step one process takes on the whole batch.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    device = next(iter(params)).device
    losses = []
    for step, ids in enumerate(batches(steps, vocab=vocab)):
        ids = ids.chunk(world_size)[rank].to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step)
    return losses, optimizer


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
        print(f"rank {rank}/{world} {args.mode}: loss {losses[0]:.4f} -> {losses[-1]:.4f}; holds "
              f"{held['total']:,} bytes (4-bit base {held['base_4bit']:,}, adapters {held['adapters']:,})",
              flush=True)
        if args.out:
            D.save_adapter(model, args.out)
            if rank == 0:
                print(f"adapter saved to {args.out}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
