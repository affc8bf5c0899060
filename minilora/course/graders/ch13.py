"""Graders for chapter 13, beyond one GPU: FSDP2's pieces, bytes sent per step, a 70B QLoRA run per GPU.

13.1 is checked against `torch.chunk` (what FSDP2 cuts a parameter with), 13.2 against exact arithmetic of
ring collectives, 13.3 against `minilora.memory.predict_training_memory` (regime "qlora"). When an answer is
wrong, the grader tries the usual slips on the same case and names the one the answer matches.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from minilora import memory as M
from minilora.course.grading import ExerciseFailed, expect_number, grader, numbers_close

# --- 13.1 -------------------------------------------------------------------------------------------------


def _pieces(n_rows: int, world: int) -> list[int]:
    chunks = [c.shape[0] for c in torch.empty(n_rows, 1).chunk(world)]
    return chunks + [0] * (world - len(chunks))  # FSDP2 gives ranks past the last chunk an empty piece


def _array_split(n: int, w: int) -> list[int]:
    return [n // w + (1 if k < n % w else 0) for k in range(w)]


def _floor_then_rest(n: int, w: int) -> list[int]:
    return [n // w] * (w - 1) + [n - (w - 1) * (n // w)]


@grader("13.1", "fsdp_pieces")
def grade_13_1(fn):
    cases = [(10, 4), (8, 2), (5, 4), (2, 4), (7, 3), (1, 8), (4096, 8), (14336, 3)]
    for n, w in cases:
        want = _pieces(n, w)
        got = fn(n, w)
        got = list(got) if isinstance(got, (list, tuple)) else got
        if got != want:
            hint = ""
            if got == _array_split(n, w):
                hint = ("; hint: that is an even split with the remainder spread over the first ranks "
                        "(numpy.array_split); torch.chunk gives every rank ceil(n / world) rows and the last "
                        "ones what is left")
            elif got == _floor_then_rest(n, w):
                hint = "; hint: pieces are ceil(n / world) rows, not floor: the LAST rank gets the short piece"
            elif isinstance(got, list) and len(got) < w:
                hint = "; hint: every rank gets a piece, even an empty one: return world_size numbers"
            raise ExerciseFailed(f"fsdp_pieces({n}, {w}): expected {want}, got {got!r}{hint}")


# --- 13.2 -------------------------------------------------------------------------------------------------


def _sent(p: int, g: int, n: int, layout: str) -> float:
    share = (n - 1) / n
    return 2 * share * g if layout == "ddp" else 2 * share * p + share * g


_MISTAKES_13_2 = {
    "a ring all-reduce is a reduce-scatter then an all-gather: each rank sends 2·(N-1)/N of the buffer":
        lambda p, g, n, lay: (n - 1) / n * g if lay == "ddp" else _sent(p, g, n, lay),
    "each rank sends (N-1)/N of a buffer in a ring collective, not the whole buffer":
        lambda p, g, n, lay: 2 * g if lay == "ddp" else 2 * p + g,
    "FSDP2 gathers each block twice per step: before its forward and again before its backward":
        lambda p, g, n, lay: _sent(p, g, n, lay) if lay == "ddp" else (n - 1) / n * (p + g),
    "FSDP2 gathers the frozen parameters too (all of `param_bytes`), and reduce-scatters only the gradients":
        lambda p, g, n, lay: _sent(p, g, n, lay) if lay == "ddp" else 3 * (n - 1) / n * g,
}


@grader("13.2", "bytes_sent_per_step")
def grade_13_2(fn):
    cases = [(1_000_000, 40_000, 2, "ddp"), (1_000_000, 40_000, 2, "fsdp"), (3_000_000, 120_000, 4, "ddp"),
             (3_000_000, 120_000, 4, "fsdp"), (5_000_000, 5_000_000, 8, "fsdp"), (800, 800, 8, "ddp")]
    for case in cases:
        want = _sent(*case)
        got = expect_number(f"bytes_sent_per_step{case}", fn(*case))
        if not numbers_close(got, want):
            hint = next((h for h, wrong in _MISTAKES_13_2.items() if numbers_close(got, wrong(*case))), None)
            raise ExerciseFailed(f"bytes_sent_per_step(param_bytes={case[0]}, grad_bytes={case[1]}, world_size="
                                 f"{case[2]}, layout={case[3]!r}): expected {want:g}, got {got:g}"
                                 + (f"; hint: {hint}" if hint else ""))


# --- 13.3 -------------------------------------------------------------------------------------------------


def _per_gpu(counts: M.ParamCounts, world: int, working: int, offload: bool) -> float:
    state = M.predict_training_memory(counts, "qlora")["state"]
    return working + (0 if offload else state / world)


def _state_by_hand(c: M.ParamCounts, bits4: float, trainable: int) -> float:
    return c.frozen * 2 + c.frozen_4bit * bits4 + c.trainable * trainable + 4 * c.tensors


@grader("13.3", "qlora_bytes_per_gpu")
def grade_13_3(fn):
    l70, l8 = M.LLAMA_SHAPES["Llama-2-70B"], M.LLAMA_SHAPES["Llama-3-8B"]
    cases: list[tuple[Any, ...]] = [
        (M.llama_param_counts(l70, 8, quantize_base=True), 2, 10_000_000_000, False),
        (M.llama_param_counts(l70, 8, quantize_base=True), 8, 10_000_000_000, False),
        (M.llama_param_counts(l70, 8, quantize_base=True), 2, 10_000_000_000, True),
        (M.llama_param_counts(l8, 16, quantize_base=True), 4, 3_000_000_000, False),
    ]
    nf4 = M.nf4_bytes_per_param()
    for counts, world, working, offload in cases:
        want = _per_gpu(counts, world, working, offload)
        got = expect_number("qlora_bytes_per_gpu", fn(counts, world, working, offload))
        if not math.isclose(got, want, rel_tol=1e-6):
            mistakes = {
                "the working set (activations, gathered layers) is not divided by N: each GPU has its own":
                    (_state_by_hand(counts, nf4, 16) + working) / world,
                "an NF4 weight is not 0.5 bytes: its block scales add 8/64 + 32/(64·256) bits (use "
                "memory.nf4_bytes_per_param())": working + _state_by_hand(counts, 0.5, 16) / world,
                "a trainable fp32 parameter costs 16 bytes: weight, gradient and Adam's m and v":
                    working + _state_by_hand(counts, nf4, 4) / world,
                "with CPU offload the sharded state lives in host memory: only the working set is on the GPU":
                    working + _state_by_hand(counts, nf4, 16) / world,
            }
            hint = next((h for h, v in mistakes.items() if math.isclose(got, v, rel_tol=1e-6)), None)
            raise ExerciseFailed(f"on {counts.total / 1e9:.1f}B parameters, world_size={world}, working_bytes="
                                 f"{working:g}, offload={offload}: expected {want:,.0f} bytes, got {got:,.0f}"
                                 + (f"; hint: {hint}" if hint else ""))
